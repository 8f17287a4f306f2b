#!/bin/sh
# SPDX-License-Identifier: LGPL-2.1-or-later
# Makes small, realistic exome-style specimen folders for the demo and tests from the
# test data Debian ships with htslib (package htslib-test: C. elegans reads and VCFs),
# converted with samtools/bgzip/tabix. Nothing here is patient data.
#   make-sequencing-samples.sh OUT_DIR [SPECIMEN_ID...]   (default: S-DEMO-01)
set -eu
out=${1:?usage: make-sequencing-samples.sh OUT_DIR [SPECIMEN_ID...]}
shift
[ $# -gt 0 ] || set -- S-DEMO-01
data=/usr/share/htslib-test/test
for tool in samtools bgzip tabix; do
  command -v $tool >/dev/null || { echo "make-sequencing-samples: $tool is missing; run scripts/install-deps.sh" >&2; exit 1; }
done
[ -f "$data/ce#1000.sam" ] || { echo "make-sequencing-samples: $data is missing; install htslib-test (scripts/install-deps.sh)" >&2; exit 1; }
for specimen in "$@"; do
  dir=$out/$specimen
  mkdir -p "$dir"
  # Reads (FASTQ.gz), alignments (coordinate-sorted BAM + index), variants (VCF.gz + index).
  samtools fastq "$data/ce#1000.sam" 2>/dev/null | bgzip -c > "$dir/${specimen}_R1.fastq.gz"
  samtools sort -o "$dir/$specimen.bam" "$data/ce#1000.sam" 2>/dev/null
  samtools index "$dir/$specimen.bam"
  bgzip -c "$data/index.vcf" > "$dir/$specimen.vcf.gz"
  tabix -p vcf "$dir/$specimen.vcf.gz"
done
echo "make-sequencing-samples: $(ls "$out" | wc -l) specimen folder(s) in $out"
