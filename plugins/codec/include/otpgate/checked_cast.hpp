// SPDX-License-Identifier: LGPL-2.1-or-later
// Narrowing that never loses a value: sizes and offsets read from the wire, size_t into
// 32-bit fields, lengths handed to C APIs that take an int. A value that does not fit is
// a bug (callers check wire values against their limits first), so it throws.
#pragma once

#include <concepts>
#include <stdexcept>
#include <utility>

namespace otpgate {

template <std::integral To, std::integral From>
constexpr To checked_cast(From value) {
  if (!std::in_range<To>(value)) throw std::range_error("checked_cast: value out of range");
  return static_cast<To>(value);
}

}  // namespace otpgate
