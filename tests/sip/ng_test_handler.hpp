// SPDX-License-Identifier: LGPL-2.1-or-later
// An ng::Handler for tests: records what it is asked, rewrites SDP to a fixed gateway
// address with ports counted up from 30000, refuses or throws on request.
#pragma once

#include <atomic>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "otpgate/sip.hpp"

namespace otpgate::test {

class RecordingHandler : public ng::Handler {
 public:
  std::string offer(const ng::Request& request) override {
    const std::lock_guard lock(mutex);
    offers.push_back(request);
    return rewritten(request);
  }
  std::string answer(const ng::Request& request) override {
    const std::lock_guard lock(mutex);
    answers.push_back(request);
    return rewritten(request);
  }
  std::optional<std::string> remove(const ng::Request& request) override {
    const std::lock_guard lock(mutex);
    for (const auto* known : {&offers, &answers}) {
      for (const auto& o : *known) {
        if (o.call_id == request.call_id) return std::nullopt;
      }
    }
    return "unknown call";
  }
  ng::QueryResult query(const ng::Request& request) override {
    ng::QueryResult r;
    r.created = 1700000000;
    r.tags.push_back({request.call_id + "-tag", "", 1700000000, {}});
    return r;
  }
  std::vector<std::string> list(std::size_t limit) override {
    list_limit = limit;
    std::vector<std::string> calls{"c1", "c2"};
    if (calls.size() > limit) calls.resize(limit);
    return calls;
  }

  std::string rewritten(const ng::Request& request) {
    if (!refuse.empty()) throw ng::Refused(refuse);
    if (!full.empty()) throw ng::Overloaded(full);
    if (throw_internal) throw std::runtime_error("port pool");
    sdp::Session s = sdp::parse(request.sdp);
    sdp::Rewrite r;
    r.address = "203.0.113.5";
    for (std::size_t i = 0; i < s.media.size(); ++i) {
      r.ports.push_back(
          {static_cast<std::uint16_t>(next_port), static_cast<std::uint16_t>(next_port + 1)});
      next_port += 2;
    }
    r.strip_ice = request.ice == "remove";
    for (const auto& what : request.replace) r.replace_origin |= what == "origin";
    return sdp::format(sdp::rewrite(std::move(s), r));
  }

  std::mutex mutex;
  std::vector<ng::Request> offers, answers;
  int next_port = 30000;
  std::size_t list_limit = 0;
  std::string refuse, full;  // full: ng::Overloaded (no lane or port left)
  bool throw_internal = false;
};

}  // namespace otpgate::test
