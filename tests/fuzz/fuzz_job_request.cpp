// SPDX-License-Identifier: LGPL-2.1-or-later
// libFuzzer target for the job API's request JSON: every input is the body of a
// job-creation request (POST /api/v1/jobs), parsed and checked as the service does,
// against a data root with specimen folders, a file and a symbolic link out of it
// (FUZZ_DATA_ROOT, made here). A RequestError is the expected answer to a bad request;
// any other exception escaping, a crash or undefined behaviour is a finding, and so is
// a request that passes although it names something outside the data root.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include "job_request.hpp"
#include "names.hpp"

using namespace otpgate::transfer;
namespace fs = std::filesystem;

namespace {

fs::path make_data_root() {
  const char* where = std::getenv("FUZZ_DATA_ROOT");
  const fs::path root = fs::absolute(where ? where : "fuzz-data-root");
  fs::create_directories(root / "S-0001" / "calls");
  fs::create_directories(root / "RUN-7");
  std::ofstream(root / "S-0001" / "reads_R1.fastq.gz") << "@r\nACGT\n+\nIIII\n";
  std::ofstream(root / "loose.bam") << "BAM";
  std::error_code ec;
  fs::create_symlink("/", root / "escape", ec);  // a link out of the data root
  fs::create_directory_symlink("S-0001", root / "alias", ec);
  return fs::canonical(root);
}

[[noreturn]] void broken(const char* rule, const std::string& value) {
  std::fprintf(stderr, "request accepted although it breaks a rule: %s (%s)\n", rule,
               value.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const fs::path root = make_data_root();
  static const TransferConfig config = [] {
    TransferConfig c;
    c.data_root = root;
    return c;
  }();
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  try {
    const detail::JobRequest request = detail::parse_job_request(body, config);
    if (!detail::valid_identifier(request.specimen_id))
      broken("the specimen ID is valid", request.specimen_id);
    const fs::path folder = request.folder;
    auto [end, _] = std::mismatch(root.begin(), root.end(), folder.begin(), folder.end());
    if (end != root.end() || folder == root || folder != fs::canonical(folder))
      broken("the folder is canonical and strictly inside the data root", folder.string());
  } catch (const detail::RequestError& e) {
    if (e.status() != 400 && e.status() != 409) broken("errors are 400 or 409", e.what());
  }
  return 0;
}
