// SPDX-License-Identifier: LGPL-2.1-or-later
// See job_request.hpp.
#include "job_request.hpp"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "names.hpp"

namespace otpgate::transfer::detail {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

JobRequest checked(const json& body, const TransferConfig& config) {
  if (!body.is_object()) throw RequestError(400, "the request body must be a JSON object");
  if (config.data_root.empty())
    throw RequestError(409, "this site has no transfer.data_root to send from");
  JobRequest request;
  request.specimen_id = body.at("specimen_id").get<std::string>();
  if (!valid_identifier(request.specimen_id))
    throw RequestError(400, specimen_id_problem(request.specimen_id));
  const std::string folder = body.at("folder").get<std::string>();
  if (!valid_relative_path(folder))
    throw RequestError(400, "folder must be a path inside the data root");
  std::error_code ec;
  const fs::path root = fs::canonical(config.data_root, ec);
  if (ec) throw RequestError(409, "transfer.data_root cannot be read: " + ec.message());
  const fs::path target = fs::canonical(root / folder, ec);
  const auto [end, _] = std::mismatch(root.begin(), root.end(), target.begin(), target.end());
  if (ec || end != root.end() || target == root)
    throw RequestError(400, "folder " + folder + " is not inside the data root");
  request.folder = target;
  if (const auto m = body.find("method"); m != body.end()) {
    const std::string text = m->get<std::string>();
    const auto method = from_string<Method>(text);
    if (!method) throw RequestError(400, "method \"" + text + "\" is not valid: use otp or aes");
    request.method = *method;
  } else {
    request.method = config.method;
  }
  request.watch = body.value("watch", false);
  request.start = body.value("start", true);
  return request;
}

}  // namespace

JobRequest parse_job_request(std::string_view body, const TransferConfig& config) {
  try {
    return checked(json::parse(body), config);
  } catch (const json::exception& e) {
    throw RequestError(400, std::string("bad request body: ") + e.what());
  }
}

}  // namespace otpgate::transfer::detail
