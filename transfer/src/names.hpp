// SPDX-License-Identifier: LGPL-2.1-or-later
// Names that arrive from the network or a request (a specimen or job ID, a relative file
// path), checked before they name anything on disk; and the data type a job's file
// names say it holds.
#pragma once

#include <string>
#include <vector>

namespace otpgate::transfer::detail {

bool valid_identifier(const std::string& text);            // 1-64 letters, digits, '-', '_', '.'
std::string specimen_id_problem(const std::string& text);  // why it is not a valid ID
bool valid_relative_path(const std::string& text);         // no '/', '.', '..' or empty parts

// FASTQ, BAM, VCF, mixed or other, from the file names (indexes and markers do not count).
std::string data_type_of(const std::vector<std::string>& paths);

}  // namespace otpgate::transfer::detail
