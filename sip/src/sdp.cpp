// SPDX-License-Identifier: LGPL-2.1-or-later
// SDP (RFC 8866) as far as a media relay needs it: sections and lines kept as received,
// the m= and c= lines parsed, and the rewrite that puts the gateway into the media path.
#include <algorithm>
#include <array>
#include <stdexcept>

#include "otpgate/sip.hpp"
#include "text.hpp"

namespace otpgate::sdp {

namespace {

std::vector<std::string_view> words(std::string_view text) {
  std::vector<std::string_view> out;
  std::size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && text[i] == ' ') ++i;
    const std::size_t start = i;
    while (i < text.size() && text[i] != ' ') ++i;
    if (i > start) out.push_back(text.substr(start, i - start));
  }
  return out;
}

[[noreturn]] void fail(std::size_t line_no, const std::string& why) {
  throw ParseError("SDP line " + std::to_string(line_no) + ": " + why);
}

Media parse_m(std::string_view value, std::size_t line_no) {
  const auto w = words(value);
  if (w.size() < 4) fail(line_no, "m= needs media, port, protocol and at least one format");
  Media m;
  m.type = std::string(w[0]);
  std::string_view port = w[1];
  if (const auto slash = port.find('/'); slash != std::string_view::npos) {
    m.port_count = std::string(port.substr(slash));
    const auto count = detail::number(port.substr(slash + 1));
    if (!count || *count == 0) {
      fail(line_no, "m= port count \"" + m.port_count + "\" is not a number");
    }
    port = port.substr(0, slash);
  }
  const auto p = detail::number(port);
  if (!p || *p > 65535) fail(line_no, "m= port \"" + std::string(port) + "\" is not 0-65535");
  m.port = static_cast<std::uint16_t>(*p);
  m.proto = std::string(w[2]);
  for (std::size_t i = 3; i < w.size(); ++i) m.formats.emplace_back(w[i]);
  return m;
}

std::optional<Connection> parse_c(std::string_view value) {
  const auto w = words(value);
  if (w.size() != 3 || w[0] != "IN" || (w[1] != "IP4" && w[1] != "IP6")) return std::nullopt;
  std::string_view address = w[2];
  // A multicast TTL/count suffix belongs to the address field; keep only the address.
  if (w[1] == "IP4") address = address.substr(0, address.find('/'));
  if (address.empty()) return std::nullopt;
  return Connection{std::string(w[1]), std::string(address)};
}

// "name" or "name:value" -> name
std::string_view attribute_name(std::string_view value) {
  return value.substr(0, value.find(':'));
}

bool is_attribute(const Line& line, std::string_view name) {
  return line.type == 'a' && attribute_name(line.value) == name;
}

constexpr std::array<std::string_view, 7> kIceAttributes{
    "ice-ufrag",   "ice-pwd",  "candidate",        "end-of-candidates",
    "ice-options", "ice-lite", "remote-candidates"};

bool is_ice(const Line& line) {
  if (line.type != 'a') return false;
  const auto name = attribute_name(line.value);
  return std::find(kIceAttributes.begin(), kIceAttributes.end(), name) != kIceAttributes.end();
}

std::optional<Direction> direction_of(const std::vector<Line>& lines) {
  for (const auto& l : lines) {
    if (l.type != 'a') continue;
    if (l.value == "sendrecv") return Direction::sendrecv;
    if (l.value == "sendonly") return Direction::sendonly;
    if (l.value == "recvonly") return Direction::recvonly;
    if (l.value == "inactive") return Direction::inactive;
  }
  return std::nullopt;
}

std::optional<std::string> otp_of(const std::vector<Line>& lines) {
  for (const auto& l : lines) {
    if (is_attribute(l, "x-otp")) {
      const auto colon = l.value.find(':');
      if (colon != std::string::npos && colon + 1 < l.value.size())
        return l.value.substr(colon + 1);
    }
  }
  return std::nullopt;
}

std::string format_m(const Media& m) {
  std::string out = m.type + ' ' + std::to_string(m.port) + m.port_count + ' ' + m.proto;
  for (const auto& f : m.formats) out += ' ' + f;
  return out;
}

void rewrite_connection(std::vector<Line>& lines, const std::string& addr_type,
                        const std::string& address) {
  for (auto& l : lines) {
    if (l.type != 'c') continue;
    const auto c = parse_c(l.value);
    if (c && c->zero()) continue;  // on hold: stays on hold
    l.value = "IN " + addr_type + ' ' + address;
  }
}

void drop(std::vector<Line>& lines, bool (*pred)(const Line&)) {
  lines.erase(std::remove_if(lines.begin(), lines.end(), pred), lines.end());
}

// Where a media-level line of type `type` goes, in RFC 8866 order (i c b k a).
std::vector<Line>::iterator position_for(std::vector<Line>& lines, char type) {
  constexpr std::string_view kOrder = "icbka";
  const auto rank = kOrder.find(type);
  return std::find_if(lines.begin(), lines.end(), [&](const Line& l) {
    const auto r = kOrder.find(l.type);
    return r != std::string_view::npos && r > rank;
  });
}

}  // namespace

bool Connection::zero() const {
  return address == "0.0.0.0" || address == "::";
}

bool Media::rtp() const {
  return proto.starts_with("RTP/") || proto.starts_with("UDP/TLS/RTP/");
}

Session parse(std::string_view text, std::size_t max_bytes) {
  if (text.size() > max_bytes) {
    throw ParseError("SDP of " + std::to_string(text.size()) + " bytes is over the limit of " +
                     std::to_string(max_bytes));
  }
  Session s;
  std::size_t line_no = 0, blank = 0;
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view raw = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!raw.empty() && raw.back() == '\r') raw.remove_suffix(1);
    if (raw.empty()) {  // a trailing blank line (some stacks add one); none inside
      blank = line_no;
      continue;
    }
    if (blank != 0) fail(blank, "blank line inside SDP");
    if (raw.size() < 2 || raw[1] != '=' || raw[0] < 'a' || raw[0] > 'z') {
      fail(line_no, "not a \"x=value\" line");
    }
    if (raw.find('\0') != std::string_view::npos || raw.find('\r') != std::string_view::npos) {
      fail(line_no, "holds a NUL or a stray CR");
    }
    const char type = raw[0];
    const std::string_view value = raw.substr(2);
    if (s.lines.empty() && (type != 'v' || value != "0")) fail(line_no, "SDP must start with v=0");
    if (type == 'm') {
      s.media.push_back(parse_m(value, line_no));
      continue;
    }
    if (type == 'c' && !parse_c(value)) {
      fail(line_no, "c= must be \"IN IP4|IP6 address\", not \"" + std::string(value) + '"');
    }
    (s.media.empty() ? s.lines : s.media.back().lines).push_back(Line{type, std::string(value)});
  }
  if (s.lines.empty()) throw ParseError("SDP is empty");
  auto has = [&](char t) {
    return std::any_of(s.lines.begin(), s.lines.end(), [&](const Line& l) { return l.type == t; });
  };
  if (!has('o')) throw ParseError("SDP has no o= line");
  if (!has('s')) throw ParseError("SDP has no s= line");
  return s;
}

std::string format(const Session& session) {
  std::string out;
  auto put = [&](char type, std::string_view value) {
    out += type;
    out += '=';
    out += value;
    out += "\r\n";
  };
  for (const auto& l : session.lines) put(l.type, l.value);
  for (const auto& m : session.media) {
    put('m', format_m(m));
    for (const auto& l : m.lines) put(l.type, l.value);
  }
  return out;
}

std::optional<Connection> connection(const Session& session, const Media& media) {
  for (const auto* lines : {&media.lines, &session.lines}) {
    for (const auto& l : *lines) {
      if (l.type == 'c') return parse_c(l.value);
    }
  }
  return std::nullopt;
}

Direction direction(const Session& session, const Media& media) {
  if (auto d = direction_of(media.lines)) return *d;
  return direction_of(session.lines).value_or(Direction::sendrecv);
}

std::optional<std::string> otp_sae(const Session& session, const Media& media) {
  if (auto sae = otp_of(media.lines)) return sae;
  return otp_of(session.lines);
}

std::vector<std::string> attributes(const Media& media, std::string_view name) {
  std::vector<std::string> out;
  for (const auto& l : media.lines) {
    if (!is_attribute(l, name)) continue;
    const auto colon = l.value.find(':');
    out.push_back(colon == std::string::npos ? std::string() : l.value.substr(colon + 1));
  }
  return out;
}

Session rewrite(Session s, const Rewrite& o) {
  if (o.address.empty()) throw std::invalid_argument("SDP rewrite: no gateway address");
  if (o.ports.size() != s.media.size()) {
    throw std::invalid_argument("SDP rewrite: " + std::to_string(o.ports.size()) +
                                " port pairs for " + std::to_string(s.media.size()) + " media");
  }
  if (o.otp_sae && (o.otp_sae->empty() ||
                    o.otp_sae->find_first_of(std::string_view("\r\n\0", 3)) != std::string::npos)) {
    throw std::invalid_argument("SDP rewrite: SAE ID for a=x-otp is empty or holds CR, LF or NUL");
  }
  const std::string addr_type = o.address.find(':') == std::string::npos ? "IP4" : "IP6";
  const bool session_c =
      std::any_of(s.lines.begin(), s.lines.end(), [](const Line& l) { return l.type == 'c'; });
  rewrite_connection(s.lines, addr_type, o.address);
  if (o.replace_origin) {
    for (auto& l : s.lines) {
      if (l.type != 'o') continue;
      auto w = words(l.value);
      if (w.size() != 6) continue;  // not RFC 8866's six fields: left alone
      l.value = std::string(w[0]) + ' ' + std::string(w[1]) + ' ' + std::string(w[2]) + " IN " +
                addr_type + ' ' + o.address;
    }
  }
  if (o.strip_ice) drop(s.lines, is_ice);
  if (o.otp_sae || o.remove_otp)
    drop(s.lines, [](const Line& l) { return is_attribute(l, "x-otp"); });

  for (std::size_t i = 0; i < s.media.size(); ++i) {
    Media& m = s.media[i];
    if (o.strip_ice) drop(m.lines, is_ice);
    if (o.otp_sae || o.remove_otp)
      drop(m.lines, [](const Line& l) { return is_attribute(l, "x-otp"); });
    if (m.rejected()) continue;  // port 0 stays rejected
    const MediaPorts& ports = o.ports[i];
    m.port = ports.rtp;
    m.port_count.clear();  // one RTP port (and its RTCP) per media at the gateway
    rewrite_connection(m.lines, addr_type, o.address);
    const bool has_c =
        std::any_of(m.lines.begin(), m.lines.end(), [](const Line& l) { return l.type == 'c'; });
    if (!session_c && !has_c) {
      m.lines.insert(position_for(m.lines, 'c'), Line{'c', "IN " + addr_type + ' ' + o.address});
    }
    const auto rtcp = std::find_if(m.lines.begin(), m.lines.end(),
                                   [](const Line& l) { return is_attribute(l, "rtcp"); });
    if (!ports.rtcp) {
      if (rtcp != m.lines.end()) m.lines.erase(rtcp);
    } else {
      const bool full = rtcp != m.lines.end() && words(rtcp->value).size() > 1;
      std::string value = "rtcp:" + std::to_string(*ports.rtcp);
      if (full) value += " IN " + addr_type + ' ' + o.address;
      if (rtcp != m.lines.end()) {
        rtcp->value = std::move(value);
      } else {
        m.lines.push_back(Line{'a', std::move(value)});
      }
    }
    if (o.otp_sae) m.lines.push_back(Line{'a', "x-otp:" + *o.otp_sae});
  }
  return s;
}

}  // namespace otpgate::sdp
