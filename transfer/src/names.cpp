// SPDX-License-Identifier: LGPL-2.1-or-later
// See names.hpp.
#include "names.hpp"

#include <algorithm>
#include <cctype>

namespace otpgate::transfer::detail {

bool valid_identifier(const std::string& text) {
  if (text.empty() || text.size() > 64 || text == "." || text == "..") return false;
  return std::all_of(text.begin(), text.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

std::string specimen_id_problem(const std::string& text) {
  return "specimen ID \"" + text + "\" is not valid: use 1-64 letters, digits, '-', '_' or '.'";
}

bool valid_relative_path(const std::string& text) {
  if (text.empty() || text.size() > 4096 || text.front() == '/') return false;
  if (text.find('\0') != std::string::npos || text.find('\\') != std::string::npos) return false;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t end = std::min(text.find('/', start), text.size());
    const std::string part = text.substr(start, end - start);
    if (part.empty() || part == "." || part == ".." || part.size() > 255) return false;
    start = end + 1;
  }
  return true;
}

std::string data_type_of(const std::vector<std::string>& paths) {
  std::string type;
  for (const auto& p : paths) {
    std::string name = p;
    std::transform(name.begin(), name.end(), name.begin(), ::tolower);
    auto ends = [&](const char* s) {
      const std::string suffix(s);
      return name.size() >= suffix.size() &&
             name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    std::string t;
    if (ends(".fastq") || ends(".fastq.gz") || ends(".fq") || ends(".fq.gz"))
      t = "FASTQ";
    else if (ends(".bam") || ends(".cram") || ends(".sam"))
      t = "BAM";
    else if (ends(".vcf") || ends(".vcf.gz") || ends(".bcf"))
      t = "VCF";
    else
      continue;  // indexes, markers, run metadata do not decide the type
    if (type.empty())
      type = t;
    else if (type != t)
      return "mixed";
  }
  return type.empty() ? "other" : type;
}

}  // namespace otpgate::transfer::detail
