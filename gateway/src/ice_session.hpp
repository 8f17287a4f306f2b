// SPDX-License-Identifier: LGPL-2.1-or-later
// ICE between the two gateways (libnice): one ICE stream of one component per media
// stream, gathered here, described in SDP, and connected once the peer's description
// has arrived (through the QKD-sealed exchange in gateway.cpp).
#pragma once

#include <nice/agent.h>

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace otpgate::gateway {

class IceSession {
 public:
  // `stun` ("host:port") is optional; without it only host candidates are gathered.
  IceSession(bool controlling, const std::vector<std::string>& stream_names,
             const std::string& stun_host, unsigned stun_port);
  ~IceSession();
  IceSession(const IceSession&) = delete;
  IceSession& operator=(const IceSession&) = delete;

  // Waits for candidate gathering; false on timeout.
  bool gather(std::chrono::milliseconds limit);
  // {"stream name": "SDP of its ICE stream", ...} as JSON text.
  std::string local_description() const;
  // Applies the peer's description; throws std::runtime_error naming the problem.
  void set_remote_description(const std::string& description);
  // Waits until every stream's component is connected; false on timeout.
  bool wait_connected(std::chrono::milliseconds limit);

  NiceAgent* agent() const { return agent_; }
  guint stream_id(const std::string& name) const { return streams_.at(name); }
  std::string state_of(const std::string& name) const;

 private:
  static void on_gathering_done(NiceAgent*, guint stream_id, gpointer self);
  static void on_state_changed(NiceAgent*, guint stream_id, guint component, guint state,
                               gpointer self);

  GMainContext* context_ = nullptr;
  GMainLoop* loop_ = nullptr;
  GThread* thread_ = nullptr;
  NiceAgent* agent_ = nullptr;
  std::map<std::string, guint> streams_;
  mutable GMutex mutex_;
  GCond changed_;
  std::map<guint, bool> gathered_;
  std::map<guint, guint> state_;
};

}  // namespace otpgate::gateway
