// SPDX-License-Identifier: LGPL-2.1-or-later
// What a job's key supply is built from: the site's KME client settings, and the offset
// journal of a send job (one pad stream per job, under state_dir).
#pragma once

#include <filesystem>
#include <string>

#include "otpgate/keyclient.hpp"
#include "otpgate/transfer.hpp"

namespace otpgate::transfer::detail {

keys::KmeClientConfig kme_client_config(const TransferConfig& config);
std::filesystem::path journal_path(const TransferConfig& config, const std::string& job_id);

}  // namespace otpgate::transfer::detail
