// Types shared by every otpgate config (kept apart from toml++ so they are cheap to include).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace otpgate::config {

// A configuration problem: one line naming the key, the value and what is expected.
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Endpoint {
  std::string host;
  std::uint16_t port = 0;
};

}  // namespace otpgate::config
