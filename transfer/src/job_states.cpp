// SPDX-License-Identifier: LGPL-2.1-or-later
// The words for job states and methods (otpgate/transfer.hpp): one table each, read both
// ways, so the database, the job API and the CLI cannot drift apart.
#include <algorithm>
#include <array>
#include <cctype>
#include <utility>

#include "otpgate/transfer.hpp"

namespace otpgate::transfer {

namespace {

template <typename Enum, std::size_t N>
using Words = std::array<std::pair<Enum, std::string_view>, N>;

constexpr Words<TransferState, 7> kStates{{
    {TransferState::queued, "queued"},
    {TransferState::running, "running"},
    {TransferState::waiting_for_key, "waiting-for-key"},
    {TransferState::completed, "completed"},
    {TransferState::failed, "failed"},
    {TransferState::interrupted, "interrupted"},
    {TransferState::aborted, "aborted"},
}};

constexpr Words<Method, 2> kMethods{{{Method::otp, "OTP"}, {Method::aes, "AES"}}};

template <typename Enum, std::size_t N>
std::string_view word(const Words<Enum, N>& words, Enum value) {
  for (const auto& [v, w] : words)
    if (v == value) return w;
  return "?";  // not reached: every value has its word
}

bool same_letters(std::string_view a, std::string_view b, bool any_case) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [&](char x, char y) {
           return any_case ? std::tolower(static_cast<unsigned char>(x)) ==
                                 std::tolower(static_cast<unsigned char>(y))
                           : x == y;
         });
}

template <typename Enum, std::size_t N>
std::optional<Enum> named(const Words<Enum, N>& words, std::string_view text, bool any_case) {
  for (const auto& [v, w] : words)
    if (same_letters(text, w, any_case)) return v;
  return std::nullopt;
}

}  // namespace

std::string_view to_string(TransferState state) {
  return word(kStates, state);
}

std::string_view to_string(Method method) {
  return word(kMethods, method);
}

template <>
std::optional<TransferState> from_string<TransferState>(std::string_view text) {
  return named(kStates, text, false);
}

template <>
std::optional<Method> from_string<Method>(std::string_view text) {
  return named(kMethods, text, true);
}

bool active(TransferState state) {
  return state == TransferState::running || state == TransferState::waiting_for_key;
}

}  // namespace otpgate::transfer
