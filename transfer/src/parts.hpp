// SPDX-License-Identifier: LGPL-2.1-or-later
// How the pieces of otp-transfer call each other (not part of the public header).
#pragma once

#include <atomic>

#include "otpgate/transfer.hpp"
#include "tcp_socket.hpp"

namespace otpgate::transfer::detail {

// Serves one incoming connection until its job is complete, aborted or failed.
void receive_connection(JobStore& store, const TransferConfig& config, Fd socket,
                        const std::atomic<bool>& stopping);

// Ignores SIGPIPE (closed sockets are errors, not deaths) and SIGXFSZ (a file size limit
// is a write error the job reports).
void ignore_io_signals();

}  // namespace otpgate::transfer::detail
