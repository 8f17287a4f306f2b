// SPDX-License-Identifier: LGPL-2.1-or-later
#include "ice_session.hpp"

#include <nlohmann/json.hpp>
#include <stdexcept>

namespace otpgate::gateway {

IceSession::IceSession(bool controlling, const std::vector<std::string>& stream_names,
                       const std::string& stun_host, unsigned stun_port) {
  g_mutex_init(&mutex_);
  g_cond_init(&changed_);
  context_ = g_main_context_new();
  loop_ = g_main_loop_new(context_, FALSE);
  thread_ = g_thread_new(
      "otp-ice",
      [](gpointer loop) -> gpointer {
        g_main_loop_run(static_cast<GMainLoop*>(loop));
        return nullptr;
      },
      loop_);
  agent_ = nice_agent_new_full(context_, NICE_COMPATIBILITY_RFC5245,
                               NICE_AGENT_OPTION_REGULAR_NOMINATION);
  g_object_set(agent_, "controlling-mode", controlling, "upnp", FALSE, nullptr);
  if (!stun_host.empty())
    g_object_set(agent_, "stun-server", stun_host.c_str(), "stun-server-port", stun_port, nullptr);
  g_signal_connect(agent_, "candidate-gathering-done", G_CALLBACK(on_gathering_done), this);
  g_signal_connect(agent_, "component-state-changed", G_CALLBACK(on_state_changed), this);
  for (const auto& name : stream_names) {
    const guint id = nice_agent_add_stream(agent_, 1);
    if (id == 0) throw std::runtime_error("ICE: cannot add a stream for " + name);
    nice_agent_attach_recv(
        agent_, id, 1, context_, [](NiceAgent*, guint, guint, guint, gchar*, gpointer) {}, nullptr);
    streams_[name] = id;
  }
}

IceSession::~IceSession() {
  for (const auto& [name, id] : streams_)
    nice_agent_attach_recv(agent_, id, 1, context_, nullptr, nullptr);
  g_object_unref(agent_);
  g_main_loop_quit(loop_);
  g_thread_join(thread_);
  g_main_loop_unref(loop_);
  g_main_context_unref(context_);
  g_cond_clear(&changed_);
  g_mutex_clear(&mutex_);
}

void IceSession::on_gathering_done(NiceAgent*, guint stream_id, gpointer self) {
  auto* s = static_cast<IceSession*>(self);
  g_mutex_lock(&s->mutex_);
  s->gathered_[stream_id] = true;
  g_cond_broadcast(&s->changed_);
  g_mutex_unlock(&s->mutex_);
}

void IceSession::on_state_changed(NiceAgent*, guint stream_id, guint, guint state, gpointer self) {
  auto* s = static_cast<IceSession*>(self);
  g_mutex_lock(&s->mutex_);
  s->state_[stream_id] = state;
  g_cond_broadcast(&s->changed_);
  g_mutex_unlock(&s->mutex_);
}

bool IceSession::gather(std::chrono::milliseconds limit) {
  for (const auto& [name, id] : streams_) {
    if (!nice_agent_gather_candidates(agent_, id))
      throw std::runtime_error("ICE: gathering failed for " + name);
  }
  const gint64 until = g_get_monotonic_time() + limit.count() * 1000;
  g_mutex_lock(&mutex_);
  bool all = false;
  while (!(all = gathered_.size() == streams_.size())) {
    if (!g_cond_wait_until(&changed_, &mutex_, until)) break;
  }
  g_mutex_unlock(&mutex_);
  return all;
}

std::string IceSession::local_description() const {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [name, id] : streams_) {
    gchar* sdp = nice_agent_generate_local_stream_sdp(agent_, id, FALSE);
    out[name] = sdp ? sdp : "";
    g_free(sdp);
  }
  return out.dump();
}

void IceSession::set_remote_description(const std::string& description) {
  const auto remote = nlohmann::json::parse(description, nullptr, false);
  if (!remote.is_object()) throw std::runtime_error("ICE: the peer's description is not JSON");
  for (const auto& [name, id] : streams_) {
    auto it = remote.find(name);
    if (it == remote.end() || !it->is_string()) {
      throw std::runtime_error("ICE: the peer describes no stream \"" + name +
                               "\" (do both configs list it?)");
    }
    gchar* ufrag = nullptr;
    gchar* pwd = nullptr;
    GSList* candidates = nice_agent_parse_remote_stream_sdp(
        agent_, id, it->get<std::string>().c_str(), &ufrag, &pwd);
    const bool ok = candidates && ufrag && pwd &&
                    nice_agent_set_remote_credentials(agent_, id, ufrag, pwd) &&
                    nice_agent_set_remote_candidates(agent_, id, 1, candidates) > 0;
    g_slist_free_full(candidates, reinterpret_cast<GDestroyNotify>(nice_candidate_free));
    g_free(ufrag);
    g_free(pwd);
    if (!ok)
      throw std::runtime_error("ICE: cannot use the peer's candidates for stream \"" + name + "\"");
  }
}

bool IceSession::wait_connected(std::chrono::milliseconds limit) {
  const gint64 until = g_get_monotonic_time() + limit.count() * 1000;
  g_mutex_lock(&mutex_);
  auto connected = [&] {
    for (const auto& [name, id] : streams_) {
      auto it = state_.find(id);
      if (it == state_.end() || (it->second != NICE_COMPONENT_STATE_READY &&
                                 it->second != NICE_COMPONENT_STATE_CONNECTED)) {
        return false;
      }
    }
    return true;
  };
  bool ok = false;
  while (!(ok = connected())) {
    if (!g_cond_wait_until(&changed_, &mutex_, until)) break;
  }
  g_mutex_unlock(&mutex_);
  return ok;
}

std::string IceSession::state_of(const std::string& name) const {
  g_mutex_lock(&mutex_);
  auto it = state_.find(streams_.at(name));
  const guint state = it == state_.end() ? guint(NICE_COMPONENT_STATE_DISCONNECTED) : it->second;
  g_mutex_unlock(&mutex_);
  return nice_component_state_to_string(static_cast<NiceComponentState>(state));
}

}  // namespace otpgate::gateway
