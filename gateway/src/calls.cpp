// SPDX-License-Identifier: LGPL-2.1-or-later
// The gateway's ng::Handler: call legs from the site's SIP proxy (docs/sip.md, "Calls").
//
// Which leg is which: an SDP whose accepted media carry a=x-otp naming this gateway's peer
// SAE comes from the partner site; one without the marker comes from the local conference
// system. An unmarked SDP that the proxy says came in on its external interface (ng
// `direction` first entry "external") is refused, as is an offer marked for another SAE:
// nothing goes to or comes from the partner site without OTP. An answer comes from the
// other side than the offer it answers.
#include "calls.hpp"

#include "otpgate/site_config.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace otpgate::gateway {

using nlohmann::json;

namespace {

bool udp_port_free(std::uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
  if (fd < 0) return false;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  const bool free = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return free;
}

// An IP literal in one spelling (inet_ntop's; an IPv4-mapped IPv6 address as its IPv4),
// so that it compares with resolve()'s; nullopt for anything else (a host name).
std::optional<std::string> canonical_ip(const std::string& text) {
  char out[INET6_ADDRSTRLEN] = {};
  in_addr v4{};
  in6_addr v6{};
  if (::inet_pton(AF_INET, text.c_str(), &v4) != 1) {
    if (::inet_pton(AF_INET6, text.c_str(), &v6) != 1) return std::nullopt;
    if (!IN6_IS_ADDR_V4MAPPED(&v6)) {
      return ::inet_ntop(AF_INET6, &v6, out, sizeof out) ? std::optional<std::string>(out)
                                                         : std::nullopt;
    }
    std::memcpy(&v4, &v6.s6_addr[12], 4);
  }
  return ::inet_ntop(AF_INET, &v4, out, sizeof out) ? std::optional<std::string>(out)
                                                    : std::nullopt;
}

std::set<std::string> resolve(const std::string& host) {
  std::set<std::string> out{host};
  addrinfo hints{};
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0) return out;
  for (const addrinfo* a = found; a; a = a->ai_next) {
    char text[INET6_ADDRSTRLEN] = {};
    const void* addr =
        a->ai_family == AF_INET
            ? static_cast<const void*>(&reinterpret_cast<const sockaddr_in*>(a->ai_addr)->sin_addr)
            : static_cast<const void*>(
                  &reinterpret_cast<const sockaddr_in6*>(a->ai_addr)->sin6_addr);
    if (::inet_ntop(a->ai_family, addr, text, sizeof text)) out.insert(text);
  }
  ::freeaddrinfo(found);
  return out;
}

std::int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::optional<std::uint64_t> number(std::string_view text) {
  std::uint64_t n = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), n);
  if (error != std::errc() || end != text.data() + text.size() || text.empty()) return {};
  return n;
}

std::string media_name(std::size_t index, const std::string& type) {
  return "media " + std::to_string(index) + " (" + type + ")";
}

constexpr std::string_view kLaneAttribute = "x-otp-lane";
// The cipher of a media between the sites, both ways: absent or "otp" (the one-time pad),
// or "aes-256-gcm" (AES-256-GCM keyed from QKD, sip.over_budget = "aes").
constexpr std::string_view kCipherAttribute = "x-otp-cipher";
constexpr std::string_view kOtp = "otp", kAes = "aes-256-gcm";

bool is_attribute(const sdp::Line& l, std::string_view name) {
  return l.type == 'a' && l.value.starts_with(std::string(name) + ":");
}

// Caps a media section towards its endpoint: b=AS (kbit/s, rounded down, so that with its
// headers it stays near the cap) and b=TIAS in place of its own, unless it already asks
// for no more. b= lines go after i= and c=, before k= and a= (RFC 4566's order).
void cap_bandwidth(sdp::Media& m, std::uint64_t tias) {
  const sdp::Bitrate current = sdp::expected_bitrate(m);
  const bool stated =
      current.source == sdp::Bitrate::Source::tias || current.source == sdp::Bitrate::Source::as;
  if (stated && current.bits_per_second <= tias) return;
  std::erase_if(m.lines, [](const sdp::Line& l) {
    return l.type == 'b' && (l.value.starts_with("TIAS:") || l.value.starts_with("AS:"));
  });
  const auto at = std::find_if(m.lines.begin(), m.lines.end(), [](const sdp::Line& l) {
    return l.type != 'i' && l.type != 'c' && l.type != 'b';
  });
  m.lines.insert(at, {{'b', "AS:" + std::to_string(std::max<std::uint64_t>(1, tias / 1000))},
                      {'b', "TIAS:" + std::to_string(tias)}});
}

// Whether `session` puts an accepted media on hold: a direction other than sendrecv (for
// the media or the whole session) or a zero address.
bool holds(const sdp::Session& session) {
  auto one_way = [](const std::vector<sdp::Line>& lines) {
    return std::any_of(lines.begin(), lines.end(), [](const sdp::Line& l) {
      return l.type == 'a' &&
             (l.value == "sendonly" || l.value == "recvonly" || l.value == "inactive");
    });
  };
  const bool session_wide = one_way(session.lines);
  return std::any_of(session.media.begin(), session.media.end(), [&](const sdp::Media& m) {
    if (m.rejected() || !m.rtp()) return false;
    const auto c = sdp::connection(session, m);
    return session_wide || one_way(m.lines) || (c && c->zero());
  });
}

sdp::Session parsed(const ng::Request& request) {
  try {
    return sdp::parse(request.sdp);
  } catch (const sdp::ParseError& e) {
    throw ng::Refused(std::string("SDP: ") + e.what());
  }
}

}  // namespace

Calls::Calls(const GatewayConfig& config, CallMediaPlane& plane)
    : config_(config),
      sip_(*config.sip),
      plane_(plane),
      over_budget_(
          admission::over_budget_from(sip_.over_budget).value_or(admission::OverBudget::refuse)),
      peer_addresses_(resolve(config.peer_address)),
      unit_used_((sip_.port_max - sip_.port_min + 1u) / 4u, false),
      receive_lane_used_(sip_.max_media, false) {
  for (std::size_t i = 0; i < sip_.max_media; ++i) free_send_lanes_.push_back(i);
}

std::vector<Calls::Leg> Calls::read_leg(const sdp::Session& session, bool from_partner,
                                        const Call* call) const {
  std::vector<Leg> legs;
  std::set<std::size_t> lanes_named;  // by this SDP's media: one decryptor per lane
  for (std::size_t i = 0; i < session.media.size(); ++i) {
    const sdp::Media& m = session.media[i];
    Leg leg;
    leg.accepted = !m.rejected() && m.rtp();
    leg.type = m.type;
    leg.proto = m.proto;
    leg.bits_per_s = static_cast<double>(sdp::expected_bitrate(m).bits_per_second);
    leg.floor_bits_per_s = admission::floor_bits_per_s(m);
    const auto sae = sdp::otp_sae(session, m);
    if (sae && *sae != config_.peer_sae_id) {
      throw ng::Refused(media_name(i, m.type) + ": a=x-otp names SAE \"" + *sae +
                        "\", not this gateway's peer \"" + config_.peer_sae_id + "\"");
    }
    if (leg.accepted && from_partner && !sae) {
      throw ng::Refused(media_name(i, m.type) +
                        ": SDP from the partner site without a=x-otp:" + config_.peer_sae_id +
                        " refused (media towards the OTP peer is never relayed in clear)");
    }
    if (!leg.accepted) {
      legs.push_back(leg);
      continue;
    }
    const auto c = sdp::connection(session, m);
    if (!c) throw ng::Refused(media_name(i, m.type) + ": no c= line");
    const Media* known = call && i < call->media.size() ? &call->media[i] : nullptr;
    if (from_partner) {
      if (!c->zero() && !peer_addresses_.contains(c->address)) {
        throw ng::Refused(media_name(i, m.type) + ": the partner's media address " + c->address +
                          " is not peer.address " + config_.peer_address);
      }
      const auto lanes = sdp::attributes(m, kLaneAttribute);
      const auto lane = lanes.size() == 1 ? number(lanes.front()) : std::nullopt;
      if (!lane || *lane >= sip_.max_media) {
        throw ng::Refused(media_name(i, m.type) +
                          ": a=x-otp-lane missing or not below sip.max_media = " +
                          std::to_string(sip_.max_media) + " (both sites need the same)");
      }
      // A media keeps its lane while it runs (the sender never moves it): its decryptor
      // was built on it, and freeing it here would hand it to another call meanwhile.
      if (known && known->active && known->receive_lane && *known->receive_lane != *lane) {
        throw ng::Refused(media_name(i, m.type) + ": the partner moves it from key lane " +
                          std::to_string(*known->receive_lane) + " to " + std::to_string(*lane) +
                          " (a=x-otp-lane); a running media keeps its lane");
      }
      if (!lanes_named.insert(static_cast<std::size_t>(*lane)).second) {
        throw ng::Refused(media_name(i, m.type) + ": the partner names key lane " +
                          std::to_string(*lane) + " for two media (a=x-otp-lane)");
      }
      const bool ours = known && known->receive_lane == *lane;
      if (!ours && receive_lane_used_[*lane]) {
        throw ng::Refused(media_name(i, m.type) + ": the partner's key lane " +
                          std::to_string(*lane) + " is still in use by another call here");
      }
      leg.peer_lane = static_cast<std::size_t>(*lane);
      // One cipher per media, both ways: what the partner says, checked against this
      // site's policy and against what the media already runs with.
      const auto ciphers = sdp::attributes(m, kCipherAttribute);
      if (ciphers.size() > 1 ||
          (ciphers.size() == 1 && ciphers.front() != kOtp && ciphers.front() != kAes)) {
        throw ng::Refused(media_name(i, m.type) +
                          ": a=x-otp-cipher must be given once, as otp or aes-256-gcm");
      }
      const std::string cipher = ciphers.empty() ? std::string(kOtp) : ciphers.front();
      if (cipher == kAes && !aes_allowed()) {
        throw ng::Refused(media_name(i, m.type) +
                          ": the partner runs it in AES-256-GCM (a=x-otp-cipher), which this site "
                          "does not allow for calls (sip.over_budget = \"" +
                          sip_.over_budget + "\", policy.cipher = \"" + config_.cipher + "\")");
      }
      if (known && known->active && known->cipher != cipher &&
          (cipher != kAes || !known->stream.empty())) {
        throw ng::Refused(media_name(i, m.type) + ": this site runs it with " + known->cipher +
                          ", the partner with " + cipher +
                          " (a=x-otp-cipher): both ways of a media use one cipher");
      }
      leg.partner_cipher = cipher;
      if (!c->zero()) leg.rtp = Endpoint{c->address, m.port};
    } else {
      // An address, not a name: a name could resolve to the partner gateway behind the
      // check that follows, and rtpengine does not take names in c= either.
      const auto address = c->zero() ? std::optional<std::string>() : canonical_ip(c->address);
      if (!c->zero() && !address)
        throw ng::Refused(media_name(i, m.type) + ": c= " + c->address + " is not an IP address");
      // Decrypted media go to the local endpoint: never to the partner site in clear (a
      // misconfigured or hostile local device naming the peer gateway). A lab with both
      // gateways on one host shares the address with this gateway's own media_address.
      if (address && peer_addresses_.contains(*address) && c->address != sip_.media_address) {
        throw ng::Refused(media_name(i, m.type) + ": the local endpoint's address " + c->address +
                          " is the partner gateway's (peer.address " + config_.peer_address +
                          "): decrypted media would cross to the partner site in clear");
      }
      if (!c->zero()) {
        leg.rtp = Endpoint{c->address, m.port};
        std::uint16_t rtcp = m.port + 1;
        const auto a_rtcp = sdp::attributes(m, "rtcp");
        if (!a_rtcp.empty()) {
          const std::string& v = a_rtcp.front();
          const auto port = number(v.substr(0, v.find(' ')));
          if (!port || *port == 0 || *port > 65535)
            throw ng::Refused(media_name(i, m.type) + ": a=rtcp:" + v + " has no valid port");
          rtcp = static_cast<std::uint16_t>(*port);
        }
        if (!sdp::attributes(m, "rtcp-mux").empty()) rtcp = m.port;
        leg.rtcp = Endpoint{c->address, rtcp};
      } else if (!known || !known->endpoint_rtp) {
        throw ng::Refused(media_name(i, m.type) +
                          ": on hold (zero address) before its media ever flowed");
      }
    }
    legs.push_back(std::move(leg));
  }
  return legs;
}

std::optional<std::uint16_t> Calls::take_port_unit() {
  for (std::size_t tried = 0; tried < unit_used_.size(); ++tried) {
    const std::size_t unit = (next_unit_ + tried) % unit_used_.size();
    if (unit_used_[unit]) continue;
    const auto base = static_cast<std::uint16_t>(sip_.port_min + 4 * unit);
    // Another program may hold one of them: skip the unit rather than fail the call.
    if (!udp_port_free(base) || !udp_port_free(base + 2) || !udp_port_free(base + 3)) continue;
    unit_used_[unit] = true;
    next_unit_ = unit + 1;
    return base;
  }
  return std::nullopt;
}

void Calls::apply(Call& call, const std::vector<Leg>& legs,
                  const std::vector<std::optional<Admitted>>& admitted, bool from_partner,
                  bool new_call, std::vector<Media*>& allocated) {
  // A new call that does not fit may go to another instance of the proxy's set; a running
  // call's re-INVITE must stay here (the other instance has none of its state).
  auto full = [&](const std::string& detail) {
    if (new_call) throw ng::Overloaded(detail);
    throw ng::Refused(detail);
  };
  if (call.media.size() < legs.size()) call.media.resize(legs.size());
  for (std::size_t i = 0; i < legs.size(); ++i) {
    const Leg& leg = legs[i];
    Media& m = call.media[i];
    if (!leg.accepted) {
      release(m);
      continue;
    }
    if (!m.active) {
      if (free_send_lanes_.empty()) {
        full("no call key lane free: " + std::to_string(sip_.max_media) +
             " call media run already (sip.max_media)");
      }
      const auto base = take_port_unit();
      if (!base) {
        full("no media ports free in sip.port_min-sip.port_max (" + std::to_string(sip_.port_min) +
             "-" + std::to_string(sip_.port_max) + ")");
      }
      m.base = *base;
      m.send_lane = free_send_lanes_.front();
      free_send_lanes_.pop_front();
      m.active = true;
      allocated.push_back(&m);
    }
    m.type = leg.type;
    m.proto = leg.proto;
    if (i < admitted.size() && admitted[i]) {
      m.cipher = admitted[i]->cipher;
      m.cap_bits_per_s = admitted[i]->cap_bits_per_s;
    } else if (from_partner && leg.partner_cipher == kAes) {
      m.cipher = kAes;  // the partner's answer: its budget needed AES (read_leg checked it)
      m.cap_bits_per_s.reset();
    }
    const double bits = m.cap_bits_per_s
                            ? std::min(leg.bits_per_s, static_cast<double>(*m.cap_bits_per_s))
                            : leg.bits_per_s;
    m.pad_bytes_per_s = m.cipher == kAes
                            ? admission::aes_pad_bytes_per_s(bits, config_.rekey_interval)
                            : admission::pad_bytes_per_s(bits);
    if (from_partner) {
      if (m.receive_lane && *m.receive_lane != *leg.peer_lane)
        receive_lane_used_[*m.receive_lane] = false;
      m.receive_lane = leg.peer_lane;
      receive_lane_used_[*leg.peer_lane] = true;
      if (leg.rtp) m.peer_port = leg.rtp->port;  // a zero address (hold) keeps it
    } else if (leg.rtp) {
      m.endpoint_rtp = leg.rtp;
      m.endpoint_rtcp = leg.rtcp;
    }
  }
}

std::string Calls::rewritten(sdp::Session session, const Call& call, bool towards_partner,
                             const ng::Request& request) const {
  sdp::Rewrite r;
  r.address = sip_.media_address;
  r.strip_ice = true;  // neither leg does ICE with this gateway
  r.replace_origin =
      std::find(request.replace.begin(), request.replace.end(), "origin") != request.replace.end();
  for (std::size_t i = 0; i < session.media.size(); ++i) {
    sdp::Media& m = session.media[i];
    std::erase_if(m.lines, [](const sdp::Line& l) {
      return is_attribute(l, kLaneAttribute) || is_attribute(l, kCipherAttribute);
    });
    const Media* media = i < call.media.size() ? &call.media[i] : nullptr;
    if (!media || !media->active) {
      m.port = 0;  // rejected, or not RTP: this gateway relays RTP only
      r.ports.push_back({});
      continue;
    }
    if (towards_partner) {
      r.ports.push_back({media->base, std::nullopt});  // RTCP rides in the one OTP flow
    } else {
      r.ports.push_back({static_cast<std::uint16_t>(media->base + 2),
                         static_cast<std::uint16_t>(media->base + 3)});
    }
  }
  if (towards_partner) {
    r.otp_sae = config_.sae_id;
  } else {
    r.remove_otp = true;
  }
  sdp::Session out = sdp::rewrite(std::move(session), r);
  for (std::size_t i = 0; i < out.media.size(); ++i) {
    if (out.media[i].rejected()) continue;
    const Media& m = call.media[i];
    if (towards_partner) {
      out.media[i].lines.push_back(
          {'a', std::string(kLaneAttribute) + ":" + std::to_string(m.send_lane)});
      if (m.cipher == kAes)
        out.media[i].lines.push_back({'a', std::string(kCipherAttribute) + ":" + m.cipher});
    } else if (m.cap_bits_per_s) {
      cap_bandwidth(out.media[i], *m.cap_bits_per_s);  // what this gateway's key sends
    }
  }
  return sdp::format(out);
}

bool Calls::aes_allowed() const {
  return over_budget_ == admission::OverBudget::aes || config_.cipher == kAes;
}

std::vector<std::optional<Calls::Admitted>> Calls::admit(const std::vector<Leg>& legs,
                                                         const Call* call) const {
  std::vector<std::optional<Admitted>> out(legs.size());
  admission::Input in;
  std::vector<std::size_t> checked;  // legs whose media go through the budget
  for (std::size_t i = 0; i < legs.size(); ++i) {
    const bool known = call && i < call->media.size() && call->media[i].active;
    if (!legs[i].accepted || known) continue;
    Admitted& a = out[i].emplace();
    // AES by policy.cipher, or because the partner runs it in AES (agreed both ways).
    if (config_.cipher == kAes || legs[i].partner_cipher == kAes) {
      a.cipher = kAes;
      continue;
    }
    checked.push_back(i);
    in.wanted.push_back({i, legs[i].type, legs[i].bits_per_s, legs[i].floor_bits_per_s});
  }
  if (sip_.key_rate_bits_per_s == 0 || in.wanted.empty()) return out;
  for (const auto& [id, other] : calls_) {
    for (const auto& m : other.media) {
      if (!m.active) continue;
      in.calls_bytes_per_s += m.pad_bytes_per_s;
      ++in.calls_running;
    }
  }
  const CallMediaPlane::LinkBudget link = plane_.link_budget();
  in.key_rate_bytes_per_s = static_cast<double>(sip_.key_rate_bits_per_s) / 8;
  in.static_bytes_per_s = link.static_pad_bytes_per_s;
  in.static_streams = link.static_streams;
  in.held_bytes = link.held_bytes;
  in.horizon_s = sip_.admission_horizon_s;
  in.policy = over_budget_;
  in.rekey_interval = config_.rekey_interval;
  const admission::Decision d = admission::decide(in);
  if (!d.admitted) throw ng::Refused(d.reason);
  if (!d.reason.empty()) std::fprintf(stderr, "otp-gateway[info]: %s\n", d.reason.c_str());
  for (std::size_t k = 0; k < checked.size(); ++k) {
    Admitted& a = *out[checked[k]];
    a.cipher = d.media[k].aes ? kAes : kOtp;
    a.cap_bits_per_s = d.media[k].tias;
  }
  return out;
}

void Calls::start_media(Call& call) {
  for (std::size_t i = 0; i < call.media.size(); ++i) {
    Media& m = call.media[i];
    if (!m.active || !m.endpoint_rtp || !m.receive_lane || m.peer_port == 0) continue;
    StreamConfig s;
    s.name = "call-" + std::to_string(call.number) + "-" + std::to_string(i) + "-" + m.type;
    s.local_rtp_port = m.base + 2;
    s.local_rtcp_port = m.base + 3;
    s.peer_port = m.peer_port;
    s.listen_port = m.base;
    s.deliver_rtp = *m.endpoint_rtp;
    s.deliver_rtcp = m.endpoint_rtcp;
    s.cipher = m.cipher;
    if (m.stream.empty()) {
      try {
        plane_.add_stream(s, m.send_lane, *m.receive_lane);
      } catch (const std::exception& e) {
        throw ng::Refused(media_name(i, m.type) + ": " + e.what());
      }
      m.stream = s.name;
    } else if (s.peer_port != m.built.peer_port || s.deliver_rtp.host != m.built.deliver_rtp.host ||
               s.deliver_rtp.port != m.built.deliver_rtp.port ||
               s.deliver_rtcp->port != m.built.deliver_rtcp->port) {
      plane_.retarget_stream(s);  // re-INVITE: new address or port, same pad stream
    }
    m.built = s;
  }
}

void Calls::release(Media& m) {
  if (!m.stream.empty()) plane_.remove_stream(m.stream);
  m.stream.clear();
  if (m.active) {
    unit_used_[(m.base - sip_.port_min) / 4u] = false;
    free_send_lanes_.push_back(m.send_lane);  // its pad stream goes on with the next call
  }
  if (m.receive_lane) receive_lane_used_[*m.receive_lane] = false;
  m = Media{};
}

void Calls::end(Call& call) {
  for (auto& m : call.media) release(m);
}

std::string Calls::offer(const ng::Request& request) {
  sdp::Session session = parsed(request);
  bool marked = false;
  for (const auto& m : session.media) marked = marked || sdp::otp_sae(session, m).has_value();
  const bool external = !request.direction.empty() && request.direction.front() == "external";
  if (!marked && external) {
    throw ng::Refused("offer from the external interface without a=x-otp:" + config_.peer_sae_id +
                      ": refused (media towards the OTP peer is never relayed in clear)");
  }
  const bool from_partner = marked;
  // Offered to the local endpoint with SRTP asked for (RTP/SAVP, SAVPF, UDP/TLS/...):
  // rtpengine would encrypt that leg itself; this gateway does not, and a proxy must not
  // take the leg for encrypted when it is not. Unless the media are SRTP already (the
  // endpoints' own SDES, end to end). Towards the partner the pad protects the leg.
  const bool plain_media =
      std::any_of(session.media.begin(), session.media.end(), [](const sdp::Media& m) {
        return !m.rejected() && m.proto.find("SAVP") == std::string::npos;
      });
  if (from_partner && plain_media && request.transport_protocol.find("SAVP") != std::string::npos) {
    throw ng::Refused("transport-protocol " + request.transport_protocol +
                      " asks for SRTP towards the endpoint, which otp-gateway does not "
                      "terminate: drop it from the proxy's rtpengine_offer flags (endpoints "
                      "may keep their own SDES-SRTP end to end)");
  }
  // Opportunistic SRTP asked for towards the endpoint: rtpengine would offer SDES there
  // and let the endpoint choose. This gateway does not terminate SRTP, so the endpoint
  // gets the plain offer, which OSRTP allows (it falls back to RTP by design): taken,
  // with one warning, so the site's SIP team learns that leg is not encrypted.
  const bool osrtp_offer =
      std::any_of(request.osrtp.begin(), request.osrtp.end(),
                  [](const std::string& option) { return option.starts_with("offer"); });
  if (from_partner && plain_media && osrtp_offer && !told_osrtp_.exchange(true)) {
    std::fprintf(stderr,
                 "otp-gateway[warning]: call %s: the proxy asks for opportunistic SRTP "
                 "(OSRTP-offer) towards the endpoint, which otp-gateway does not terminate: "
                 "that leg stays plain RTP inside the site (drop OSRTP-offer from the "
                 "rtpengine_offer flags; said once)\n",
                 request.call_id.c_str());
  }
  const std::lock_guard lock(mutex_);
  const auto found = calls_.find(request.call_id);
  const bool reoffer = found != calls_.end();
  if (reoffer) {
    Call& known = found->second;
    if (known.delete_at) {  // an offer within the delete-delay revives the call
      known.delete_at.reset();
      ++stats_.revived;
      std::fprintf(stderr, "otp-gateway[info]: call %s: a new offer within its delete-delay\n",
                   known.call_id.c_str());
    }
    // The same offer again (the proxy ran a resent INVITE through rtpengine_offer): the
    // same SDP as the first time, and the call as it is, answered or not. Running it again
    // would take lanes and ports anew for media the answer had refused.
    const auto& last = known.last_offer;
    if (last && last->sdp == request.sdp && last->tag == request.from_tag &&
        last->from_partner == from_partner) {
      // A parallel fork sends the same offer once per branch: each branch is known, so
      // that a delete of a losing one ends only that branch (see remove()).
      if (!request.via_branch.empty()) known.via_branches.insert(request.via_branch);
      ++stats_.repeated_offers;
      known.last_signal = unix_now();
      known.last_activity = Clock::now();
      return last->reply;
    }
  }
  const std::vector<Leg> legs = read_leg(session, from_partner, reoffer ? &found->second : nullptr);
  Call fresh;
  Call& call = reoffer ? found->second : fresh;
  if (!reoffer) {
    call.call_id = request.call_id;
    call.from_tag = request.from_tag;
    call.number = next_number_++;
    call.created = unix_now();
    call.local_alive = call.peer_alive = Clock::now();
  }
  std::vector<Media*> allocated;
  try {
    const auto admitted = admit(legs, reoffer ? &found->second : nullptr);
    apply(call, legs, admitted, from_partner, !reoffer, allocated);
    call.offer_from_partner = from_partner;
    call.last_signal = unix_now();
    call.last_activity = Clock::now();
    if (call.answered) start_media(call);  // a re-INVITE of a running call
    call.on_hold = holds(session);
    std::string sdp = rewritten(std::move(session), call, !from_partner, request);
    call.last_offer = Exchange{request.from_tag, from_partner, request.sdp, sdp};
    call.last_answer.reset();  // a new offer: the next answer is a new one
    if (!request.via_branch.empty()) {
      call.via_branch = request.via_branch;
      call.via_branches.insert(request.via_branch);
    }
    if (!reoffer) calls_.emplace(call.call_id, std::move(fresh));
    return sdp;
  } catch (const ng::Overloaded& e) {
    for (Media* m : allocated) release(*m);
    if (!reoffer) end(fresh);
    ++stats_.refused_full;
    std::fprintf(stderr,
                 "otp-gateway[warning]: offer for call %s refused, this instance is full: %s "
                 "(answered so that the proxy may try the next instance of its set)\n",
                 request.call_id.c_str(), e.what());
    throw;
  } catch (...) {
    for (Media* m : allocated) release(*m);
    if (!reoffer) end(fresh);
    throw;
  }
}

std::string Calls::answer(const ng::Request& request) {
  sdp::Session session = parsed(request);
  const std::lock_guard lock(mutex_);
  const auto found = calls_.find(request.call_id);
  if (found == calls_.end()) throw ng::Refused("unknown call-id " + request.call_id);
  Call& call = found->second;
  // A retransmitted 200 OK through rtpengine_answer again: the same SDP, nothing changed.
  if (call.last_answer && call.last_answer->sdp == request.sdp &&
      call.last_answer->tag == request.to_tag) {
    ++stats_.repeated_answers;
    call.last_signal = unix_now();
    call.last_activity = Clock::now();
    return call.last_answer->reply;
  }
  if (session.media.size() != call.media.size()) {
    throw ng::Refused("the answer has " + std::to_string(session.media.size()) +
                      " media, the offer had " + std::to_string(call.media.size()));
  }
  const bool from_partner = !call.offer_from_partner;
  const std::vector<Leg> legs = read_leg(session, from_partner, &call);
  std::vector<Media*> allocated;
  for (std::size_t i = 0; i < legs.size(); ++i) {
    if (legs[i].accepted && !call.media[i].active)
      throw ng::Refused(media_name(i, session.media[i].type) + ": accepted, but not offered");
  }
  apply(call, legs, {}, from_partner, false, allocated);
  call.to_tag = request.to_tag;
  if (!request.to_tag.empty()) call.answer_tags.insert(request.to_tag);
  if (!request.via_branch.empty()) {  // the branch that answered is the one running
    call.via_branch = request.via_branch;
    call.via_branches.insert(request.via_branch);
  }
  call.answered = true;
  call.last_signal = unix_now();
  call.last_activity = Clock::now();
  try {
    start_media(call);
  } catch (...) {
    end(call);
    calls_.erase(found);
    throw;
  }
  call.on_hold = call.on_hold || holds(session);
  std::string sdp = rewritten(std::move(session), call, !from_partner, request);
  call.last_answer = Exchange{request.to_tag, from_partner, request.sdp, sdp};
  return sdp;
}

std::optional<std::string> Calls::remove(const ng::Request& request) {
  const std::lock_guard lock(mutex_);
  const auto found = calls_.find(request.call_id);
  if (found == calls_.end()) return "unknown call";
  Call& call = found->second;
  // A branch of a forked call that is not the one running here (e.g. the early media of a
  // callee that lost to another's 200 OK): only that branch ends, and it holds nothing
  // here. The call's own tags (either way round: a BYE from the callee swaps them), a tag
  // this gateway never answered, or a call with one branch: the whole call, as rtpengine.
  const std::string& tag = request.to_tag;
  const bool other_branch = !tag.empty() && call.answer_tags.size() > 1 &&
                            call.answer_tags.contains(tag) && tag != call.to_tag &&
                            tag != call.from_tag && request.from_tag != call.to_tag;
  // A via-branch: a branch of a fork that is not the running one (before any answer,
  // every branch is a candidate: one that fails leaves the others ringing).
  const std::string& via = request.via_branch;
  const bool other_via = !via.empty() && call.via_branches.size() > 1 &&
                         call.via_branches.contains(via) &&
                         (!call.answered || via != call.via_branch);
  if (other_branch || other_via) {
    if (other_branch) call.answer_tags.erase(tag);
    if (other_via) call.via_branches.erase(via);
    ++stats_.branch_deletes;
    std::fprintf(stderr, "otp-gateway[info]: call %s: branch %s%s deleted, the call goes on\n",
                 call.call_id.c_str(), other_branch ? "to-tag " : "via-branch ",
                 (other_branch ? tag : via).c_str());
    return std::nullopt;
  }
  // At most a day: a proxy's delete-delay near 2^63 s would overflow the clock.
  const std::int64_t delay =
      std::clamp<std::int64_t>(request.delete_delay.value_or(sip_.delete_delay_s), 0, 86400);
  if (delay == 0) {
    end(call);
    calls_.erase(found);
    return std::nullopt;
  }
  // rtpengine's delete-delay: the media go on that long (a late re-offer revives the call).
  call.delete_at = Clock::now() + std::chrono::seconds(delay);
  call.last_signal = unix_now();
  ++stats_.delayed_deletes;
  return std::nullopt;
}

ng::QueryResult Calls::query(const ng::Request& request) {
  const std::lock_guard lock(mutex_);
  const auto found = calls_.find(request.call_id);
  if (found == calls_.end()) throw ng::Refused("unknown call-id " + request.call_id);
  const Call& call = found->second;
  ng::QueryResult r;
  r.created = call.created;
  r.last_signal = call.last_signal;
  ng::TagStats tag{call.from_tag, call.to_tag, call.created, {}};
  for (const auto& m : call.media) {
    if (!m.active) continue;
    ng::MediaStats media{m.type, m.proto, {}};
    ng::StreamStats s;
    s.local_port = m.base + 2;
    if (m.endpoint_rtp) {
      s.endpoint_address = m.endpoint_rtp->host;
      s.endpoint_port = m.endpoint_rtp->port;
    }
    if (const auto c = m.stream.empty() ? std::nullopt : plane_.counters(m.stream))
      s.packets = c->packets_from_local;
    media.streams.push_back(s);
    tag.medias.push_back(std::move(media));
  }
  r.tags.push_back(std::move(tag));
  return r;
}

std::vector<std::string> Calls::list(std::size_t limit) {
  const std::lock_guard lock(mutex_);
  std::vector<std::string> ids;
  for (const auto& [id, call] : calls_) {
    if (ids.size() >= limit) break;
    ids.push_back(id);
  }
  return ids;
}

CallMediaPlane::Counters Calls::totals(const Call& call) const {
  CallMediaPlane::Counters t;
  for (const auto& m : call.media) {
    if (m.stream.empty()) continue;
    if (const auto c = plane_.counters(m.stream)) {
      t.packets_from_local += c->packets_from_local;
      t.packets_from_peer += c->packets_from_peer;
      t.packets_to_local += c->packets_to_local;
    }
  }
  return t;
}

void Calls::expire(Clock::time_point now) {
  const std::lock_guard lock(mutex_);
  const auto timeout = std::chrono::seconds(sip_.media_timeout_s);
  for (auto it = calls_.begin(); it != calls_.end();) {
    Call& call = it->second;
    if (call.delete_at && now >= *call.delete_at) {
      std::fprintf(stderr, "otp-gateway[info]: call %s ended: its delete-delay is over\n",
                   call.call_id.c_str());
      end(call);
      it = calls_.erase(it);
      continue;
    }
    const auto t = totals(call);
    if (t.packets_from_local != call.last_from_local) {
      call.last_from_local = t.packets_from_local;
      call.local_alive = now;
    }
    // From the partner: what decrypted (announcements and garbage sent to the OTP port
    // do not keep a call alive).
    if (t.packets_to_local != call.last_from_peer) {
      call.last_from_peer = t.packets_to_local;
      call.peer_alive = now;
    }
    // Both sides must show life (or the proxy signal): a caller that keeps sending after
    // the callee vanished without a BYE the proxy saw would otherwise hold its lanes and
    // spend pad for nobody, forever.
    const auto quiet_since =
        std::max(call.last_activity, std::min(call.local_alive, call.peer_alive));
    if (now - quiet_since < timeout) {
      ++it;
      continue;
    }
    const bool local = now - call.local_alive < timeout, peer = now - call.peer_alive < timeout;
    if ((local || peer) && call.on_hold) {  // one way is what a held call carries
      ++it;
      continue;
    }
    if (local || peer) {
      ++stats_.timed_out_one_way;
      std::fprintf(stderr,
                   "otp-gateway[info]: call %s ended: nothing from the %s for %u s while the %s "
                   "still sends, and no signal (sip.media_timeout_s)\n",
                   call.call_id.c_str(), local ? "partner gateway" : "local endpoint",
                   sip_.media_timeout_s, local ? "local endpoint" : "partner gateway");
    } else {
      ++stats_.timed_out;
      std::fprintf(stderr,
                   "otp-gateway[info]: call %s ended: no media and no signal for %u s "
                   "(sip.media_timeout_s)\n",
                   call.call_id.c_str(), sip_.media_timeout_s);
    }
    end(call);
    it = calls_.erase(it);
  }
}

json Calls::counters() const {
  const std::lock_guard lock(mutex_);
  return {{"repeated_offers", stats_.repeated_offers},
          {"repeated_answers", stats_.repeated_answers},
          {"offers_refused_full", stats_.refused_full},
          {"branch_deletes", stats_.branch_deletes},
          {"delayed_deletes", stats_.delayed_deletes},
          {"revived", stats_.revived},
          {"timed_out", stats_.timed_out},
          {"timed_out_one_way", stats_.timed_out_one_way}};
}

ng::ListenerOptions Calls::listener_options() const {
  ng::ListenerOptions o;
  o.clients.loopback = !sip_.ng_clients_set;
  for (const auto& host : sip_.ng_clients) {
    const std::size_t before = o.clients.addresses.size();
    for (const auto& address : resolve(host)) {
      // resolve() keeps the name itself beside its addresses; only addresses match sources.
      in6_addr any{};
      if (inet_pton(AF_INET, address.c_str(), &any) == 1 ||
          inet_pton(AF_INET6, address.c_str(), &any) == 1)
        o.clients.addresses.push_back(ng::plain_address(address));
    }
    if (o.clients.addresses.size() == before) {
      std::fprintf(stderr,
                   "otp-gateway[warning]: sip.ng_clients: \"%s\" does not resolve now; it "
                   "cannot send ng commands until the gateway restarts\n",
                   host.c_str());
    }
  }
  if (sip_.ng_clients_set && o.clients.addresses.empty()) {
    throw std::runtime_error("sip.ng_clients: none of them resolves to an address");
  }
  o.log = [](const std::string& line) {
    std::fprintf(stderr, "otp-gateway[warning]: %s\n", line.c_str());
  };
  return o;
}

json Calls::status() const {
  const std::lock_guard lock(mutex_);
  json list = json::array();
  for (const auto& [id, call] : calls_) {
    json media = json::array();
    for (std::size_t i = 0; i < call.media.size(); ++i) {
      const Media& m = call.media[i];
      if (!m.active) continue;
      json j{{"index", i},
             {"type", m.type},
             {"stream", m.stream.empty() ? json(nullptr) : json(m.stream)},
             {"local_rtp_port", m.base + 2},
             {"local_rtcp_port", m.base + 3},
             {"listen_port", m.base},
             {"peer_port", m.peer_port},
             {"endpoint", m.endpoint_rtp ? json(m.endpoint_rtp->host + ":" +
                                                std::to_string(m.endpoint_rtp->port))
                                         : json(nullptr)},
             {"send_lane", m.send_lane},
             {"cipher", m.cipher},
             {"cap_bits_per_s", m.cap_bits_per_s ? json(*m.cap_bits_per_s) : json(nullptr)},
             {"expected_pad_bits_per_s", std::lround(m.pad_bytes_per_s * 8)},
             {"receive_lane", m.receive_lane ? json(*m.receive_lane) : json(nullptr)}};
      const auto c = m.stream.empty() ? std::nullopt : plane_.counters(m.stream);
      const CallMediaPlane::Counters zero;
      const auto& k = c ? *c : zero;
      j["packets"] = {{"from_local", k.packets_from_local},
                      {"to_peer", k.packets_to_peer},
                      {"from_peer", k.packets_from_peer},
                      {"to_local", k.packets_to_local}};
      j["key_used_bytes"] = {{"send", k.pad_bytes_send}, {"receive", k.pad_bytes_receive}};
      media.push_back(std::move(j));
    }
    list.push_back({{"call_id", id},
                    {"from_tag", call.from_tag},
                    {"to_tag", call.to_tag},
                    {"offer_from", call.offer_from_partner ? "partner" : "local"},
                    {"state", call.delete_at  ? "deleting"
                              : call.answered ? "answered"
                                              : "offered"},
                    {"created", call.created},
                    {"media", std::move(media)}});
  }
  return list;
}

std::size_t Calls::free_send_lanes() const {
  const std::lock_guard lock(mutex_);
  return free_send_lanes_.size();
}

std::size_t Calls::free_port_units() const {
  const std::lock_guard lock(mutex_);
  return static_cast<std::size_t>(std::count(unit_used_.begin(), unit_used_.end(), false));
}

}  // namespace otpgate::gateway
