// SPDX-License-Identifier: LGPL-2.1-or-later
// Locked memory in tests: how much this process has locked, and running a test body in a
// child held to RLIMIT_MEMLOCK as an unprivileged service is.
#pragma once

#include <gtest/gtest.h>
#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <fstream>
#include <functional>
#include <stdexcept>
#include <string>

namespace otpgate::test {

// Locked memory of this process, in KiB (/proc/self/status VmLck).
inline std::size_t vm_locked_kib() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmLck:", 0) == 0) return std::stoul(line.substr(6));
  }
  // Without the field every check on it would pass whatever the arena did.
  throw std::runtime_error("/proc/self/status has no VmLck line");
}

// Runs `body` in a forked child that holds RLIMIT_MEMLOCK as an unprivileged service
// does: CAP_IPC_LOCK dropped (root, as in CI, has it and would bypass the limit) and the
// limit set to what is locked already plus `headroom` bytes. `body` returns "" when all
// is well, else what went wrong; "skip: ..." when the child could not drop the capability.
inline std::string with_memlock_limit(std::size_t headroom,
                                      const std::function<std::string()>& body) {
  int fds[2];
  if (::pipe(fds) != 0) return "pipe failed";
  const pid_t pid = ::fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    ::close(fds[0]);
    std::string result;
    __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct caps[_LINUX_CAPABILITY_U32S_3] = {};
    // Never above the hard limit this process has: raising it needs CAP_SYS_RESOURCE,
    // which a container may not grant (what is locked already can then eat into the
    // headroom, by the small secrets' pool slabs the child locked again after the fork).
    rlimit current{};
    ::getrlimit(RLIMIT_MEMLOCK, &current);
    const rlim_t wanted = vm_locked_kib() * 1024 + headroom;
    const rlim_t bound = current.rlim_max == RLIM_INFINITY ? wanted : current.rlim_max;
    const rlimit limit{std::min(wanted, bound), std::min(wanted, bound)};
    if (::syscall(SYS_capget, &header, caps) != 0) {
      result = "skip: capget failed";
    } else {
      caps[CAP_TO_INDEX(CAP_IPC_LOCK)].effective &= ~CAP_TO_MASK(CAP_IPC_LOCK);
      caps[CAP_TO_INDEX(CAP_IPC_LOCK)].permitted &= ~CAP_TO_MASK(CAP_IPC_LOCK);
      if (::syscall(SYS_capset, &header, caps) != 0) {
        result = "skip: could not drop CAP_IPC_LOCK";
      } else if (::setrlimit(RLIMIT_MEMLOCK, &limit) != 0) {
        result = "setrlimit(RLIMIT_MEMLOCK) failed";
      } else {
        try {
          result = body();
        } catch (const std::exception& e) {
          result = std::string("threw: ") + e.what();
        }
      }
    }
    const ssize_t ignored = ::write(fds[1], result.data(), result.size());
    (void)ignored;
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string result;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) result.append(buf, std::size_t(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return "the child died: " + result;
  return result;
}

}  // namespace otpgate::test

#define RUN_WITH_MEMLOCK_LIMIT(headroom, ...)                                               \
  do {                                                                                      \
    const std::string problem = otpgate::test::with_memlock_limit((headroom), __VA_ARGS__); \
    if (problem.rfind("skip: ", 0) == 0) GTEST_SKIP() << problem;                           \
    EXPECT_EQ(problem, "");                                                                 \
  } while (false)
