// SPDX-License-Identifier: LGPL-2.1-or-later
// rtpengine's ng control protocol, message layer: a datagram is "COOKIE SP bencoded-dict";
// requests are typed into ng::Request, replies built as dictionaries and sent back with
// the same cookie; a reply cache answers retransmissions without running them again.
#include <algorithm>
#include <array>
#include <charconv>

#include "otpgate/sip.hpp"

namespace otpgate::ng {

namespace {

bool is_control(char c) {
  return static_cast<unsigned char>(c) < 0x20 || c == 0x7f;
}

// `text` for a log line: its control characters as '?', so that bytes a client sent (a
// command name, a key, a reason quoting them) can never start a line of their own.
std::string one_line(std::string text) {
  std::replace_if(text.begin(), text.end(), is_control, '?');
  return text;
}

constexpr std::size_t kMaxCookie = 64;

// "received from" and "received-from" are the same key, as are flag spellings.
std::string hyphenated(std::string_view text) {
  std::string out(text);
  std::replace(out.begin(), out.end(), ' ', '-');
  return out;
}

struct CommandName {
  std::string_view name;
  Command command;
};
constexpr std::array<CommandName, 6> kCommands{{{"ping", Command::ping},
                                                {"offer", Command::offer},
                                                {"answer", Command::answer},
                                                {"delete", Command::remove},
                                                {"query", Command::query},
                                                {"list", Command::list}}};

class Reader {
 public:
  explicit Reader(const bencode::Dict& dict) {
    for (const auto& [key, value] : dict) {
      auto [it, inserted] = keys_.emplace(hyphenated(key), &value);
      if (!inserted) throw Refused("key \"" + key + "\" given twice (with a space and a hyphen)");
    }
  }

  const bencode::Value* find(std::string_view key) const {
    const auto it = keys_.find(std::string(key));
    return it == keys_.end() ? nullptr : it->second;
  }

  std::string string(std::string_view key, bool required = false) const {
    const bencode::Value* v = find(key);
    if (v == nullptr) {
      if (required) throw Refused("missing key \"" + std::string(key) + '"');
      return {};
    }
    if (const auto* s = v->string()) return *s;
    throw Refused("key \"" + std::string(key) + "\" must be a string");
  }

  // A list of strings; a single string counts as a list of one (some modules send that).
  std::vector<std::string> strings(std::string_view key, bool hyphenate = false) const {
    std::vector<std::string> out;
    const bencode::Value* v = find(key);
    if (v == nullptr) return out;
    if (const auto* s = v->string()) {
      out.push_back(hyphenate ? hyphenated(*s) : *s);
      return out;
    }
    const auto* l = v->list();
    if (l == nullptr) throw Refused("key \"" + std::string(key) + "\" must be a list of strings");
    for (const auto& item : *l) {
      const auto* s = item.string();
      if (s == nullptr) throw Refused("key \"" + std::string(key) + "\" must be a list of strings");
      out.push_back(hyphenate ? hyphenated(*s) : *s);
    }
    return out;
  }

  std::optional<std::int64_t> integer(std::string_view key) const {
    const bencode::Value* v = find(key);
    if (v == nullptr) return std::nullopt;
    if (const auto* i = v->integer()) return *i;
    // rtpengine accepts numbers as strings too; so do we, strictly decimal.
    if (const auto* s = v->string()) {
      std::int64_t n = 0;
      const char* end = s->data() + s->size();
      const auto [ptr, ec] = std::from_chars(s->data(), end, n);
      if (!s->empty() && ec == std::errc() && ptr == end) return n;
    }
    throw Refused("key \"" + std::string(key) + "\" must be an integer");
  }

 private:
  std::map<std::string, const bencode::Value*, std::less<>> keys_;
};

}  // namespace

std::string_view command_name(Command command) {
  for (const auto& c : kCommands) {
    if (c.command == command) return c.name;
  }
  return "?";
}

bool Request::has_flag(std::string_view flag) const {
  const std::string wanted = hyphenated(flag);
  return std::find(flags.begin(), flags.end(), wanted) != flags.end();
}

Request parse_request(const bencode::Value& value) {
  const bencode::Dict* dict = value.dict();
  if (dict == nullptr) throw Refused("the message is not a dictionary");
  const Reader r(*dict);
  Request q;
  const std::string name = r.string("command", true);
  const auto* known = std::find_if(kCommands.begin(), kCommands.end(),
                                   [&](const CommandName& c) { return c.name == name; });
  if (known == kCommands.end()) throw Refused("unknown command \"" + name + '"');
  q.command = known->command;
  q.dict = *dict;
  if (q.command == Command::ping) return q;
  const bool needs_tags = q.command != Command::query && q.command != Command::list;
  q.call_id = r.string("call-id", q.command != Command::list);
  q.from_tag = r.string("from-tag", needs_tags);
  q.to_tag = r.string("to-tag", q.command == Command::answer);
  q.via_branch = r.string("via-branch");
  // SIP headers carry none, and these go into log lines and the status: a newline in a
  // call-id would forge a log line.
  for (const auto& [key, field] : {std::pair{"call-id", &q.call_id},
                                   {"from-tag", &q.from_tag},
                                   {"to-tag", &q.to_tag},
                                   {"via-branch", &q.via_branch}}) {
    if (std::any_of(field->begin(), field->end(), is_control))
      throw Refused("key \"" + std::string(key) + "\" has a control character");
  }
  if (q.command == Command::offer || q.command == Command::answer) {
    q.sdp = r.string("sdp", true);
    if (q.sdp.empty()) throw Refused("empty SDP");
  }
  q.flags = r.strings("flags", true);
  q.replace = r.strings("replace", true);
  q.direction = r.strings("direction");
  q.rtcp_mux = r.strings("rtcp-mux", true);
  q.supports = r.strings("supports", true);
  // Opportunistic SRTP, as rtpengine takes it: a list under "OSRTP" (or "osrtp"), or a
  // flag "OSRTP-offer" (what Kamailio's module passes on from rtpengine_offer's flags).
  for (const char* key : {"OSRTP", "osrtp"}) {
    for (auto& option : r.strings(key, true)) q.osrtp.push_back(std::move(option));
  }
  for (const auto& flag : q.flags) {
    if (flag.size() > 6 && (flag.starts_with("OSRTP-") || flag.starts_with("osrtp-"))) {
      q.osrtp.push_back(flag.substr(6));
    }
  }
  q.ice = r.string("ICE");
  q.transport_protocol = r.string("transport-protocol");
  q.address_family = r.string("address-family");
  q.sip_message_type = r.string("sip-message-type");
  const auto from = r.strings("received-from");
  if (!from.empty()) {
    if (from.size() != 2) throw Refused("key \"received-from\" must be [family, address]");
    q.received_from_family = from[0];
    q.received_from_address = from[1];
  }
  q.limit = r.integer("limit");
  if (q.limit && *q.limit <= 0) throw Refused("key \"limit\" must be above 0");
  q.delete_delay = r.integer("delete-delay");
  return q;
}

std::optional<Datagram> split_datagram(std::string_view datagram) {
  const std::size_t space = datagram.find(' ');
  if (space == 0 || space == std::string_view::npos || space > kMaxCookie) return std::nullopt;
  const std::string_view cookie = datagram.substr(0, space);
  for (const char c : cookie) {
    if (static_cast<unsigned char>(c) < 0x21 || c == 0x7f) return std::nullopt;
  }
  return Datagram{cookie, datagram.substr(space + 1)};
}

bencode::Dict reply_pong() {
  return {{"result", "pong"}};
}

bencode::Dict reply_ok(std::string_view sdp, std::string_view warning) {
  bencode::Dict d{{"result", "ok"}};
  if (!sdp.empty()) d.emplace("sdp", sdp);
  if (!warning.empty()) d.emplace("warning", warning);
  return d;
}

bencode::Dict reply_error(std::string_view reason) {
  return {{"result", "error"}, {"error-reason", reason}};
}

std::string format_reply(std::string_view cookie, const bencode::Dict& reply) {
  std::string out(cookie);
  out += ' ';
  out += bencode::encode(reply);
  return out;
}

bencode::Dict reply_query(const QueryResult& result) {
  bencode::Dict rtp_totals{{"packets", 0}, {"bytes", 0}, {"errors", 0}};
  bencode::Dict rtcp_totals = rtp_totals;
  auto add = [](bencode::Dict& totals, const StreamStats& s) {
    auto bump = [&](const char* key, std::uint64_t n) {
      auto& v = std::get<std::int64_t>(totals[key].v);
      v += static_cast<std::int64_t>(n);
    };
    bump("packets", s.packets);
    bump("bytes", s.bytes);
    bump("errors", s.errors);
  };
  bencode::Dict tags;
  for (const auto& tag : result.tags) {
    bencode::List medias;
    std::int64_t index = 0;
    for (const auto& media : tag.medias) {
      bencode::List streams;
      for (const auto& s : media.streams) {
        bencode::Dict stream{
            {"local port", s.local_port},
            {"flags", bencode::List{s.rtcp ? "RTCP" : "RTP"}},
            {"stats", bencode::Dict{{"packets", static_cast<std::int64_t>(s.packets)},
                                    {"bytes", static_cast<std::int64_t>(s.bytes)},
                                    {"errors", static_cast<std::int64_t>(s.errors)}}},
        };
        if (!s.endpoint_address.empty()) {
          const bool v6 = s.endpoint_address.find(':') != std::string::npos;
          stream.emplace("endpoint", bencode::Dict{{"family", v6 ? "IPv6" : "IPv4"},
                                                   {"address", s.endpoint_address},
                                                   {"port", s.endpoint_port}});
        }
        if (s.last_packet != 0) stream.emplace("last packet", s.last_packet);
        add(s.rtcp ? rtcp_totals : rtp_totals, s);
        streams.emplace_back(std::move(stream));
      }
      medias.emplace_back(bencode::Dict{{"index", ++index},
                                        {"type", media.type},
                                        {"protocol", media.protocol},
                                        {"streams", std::move(streams)}});
    }
    bencode::Dict entry{{"tag", tag.tag}, {"created", tag.created}, {"medias", std::move(medias)}};
    if (!tag.in_dialogue_with.empty()) entry.emplace("in dialogue with", tag.in_dialogue_with);
    tags.insert_or_assign(tag.tag, std::move(entry));
  }
  return {
      {"result", "ok"},
      {"created", result.created},
      {"last signal", result.last_signal},
      {"tags", std::move(tags)},
      {"totals", bencode::Dict{{"RTP", std::move(rtp_totals)}, {"RTCP", std::move(rtcp_totals)}}}};
}

bencode::Dict reply_list(const std::vector<std::string>& call_ids) {
  bencode::List calls(call_ids.begin(), call_ids.end());
  return {{"result", "ok"}, {"calls", std::move(calls)}};
}

const std::string* ReplyCache::find(const std::string& key, std::string_view request,
                                    Clock::time_point now, bool* reused) {
  expire(now);
  const auto it = replies_.find(key);
  if (reused) *reused = it != replies_.end() && it->second.request != request;
  if (it == replies_.end() || it->second.request != request) return nullptr;
  return &it->second.reply;
}

void ReplyCache::erase(const std::string& key) {
  const auto it = replies_.find(key);
  if (it == replies_.end()) return;
  bytes_ -= it->second.request.size() + it->second.reply.size();
  replies_.erase(it);
}

void ReplyCache::insert(const std::string& key, std::string request, std::string reply,
                        Clock::time_point now) {
  expire(now);
  const std::size_t size = request.size() + reply.size();
  if (max_entries_ == 0 || size > max_bytes_) return;
  erase(key);  // a reused cookie: the new request replaces the old one
  while ((replies_.size() >= max_entries_ || bytes_ + size > max_bytes_) && !order_.empty()) {
    // Entries of keys that were replaced since are skipped by their time stamp.
    const auto& [at, oldest] = order_.front();
    const auto it = replies_.find(oldest);
    if (it != replies_.end() && it->second.at == at) erase(oldest);
    order_.pop_front();
  }
  bytes_ += size;
  replies_.insert_or_assign(key, Entry{std::move(request), std::move(reply), now});
  order_.emplace_back(now, key);
}

void ReplyCache::expire(Clock::time_point now) {
  while (!order_.empty() && now - order_.front().first > max_age_) {
    const auto& [at, key] = order_.front();
    const auto it = replies_.find(key);
    if (it != replies_.end() && it->second.at == at) erase(key);
    order_.pop_front();
  }
}

bencode::Dict Processor::execute(std::string_view body, std::string& what) {
  std::optional<Request> request;
  try {
    request = parse_request(bencode::decode(body, limits_));
    const Request& q = *request;
    what = std::string(command_name(q.command));
    if (!q.call_id.empty()) what += " for call " + q.call_id;
    switch (q.command) {
      case Command::ping:
        return reply_pong();
      case Command::offer:
        return reply_ok(handler_.offer(q));
      case Command::answer:
        return reply_ok(handler_.answer(q));
      case Command::remove: {
        const auto warning = handler_.remove(q);
        return reply_ok({}, warning.value_or(std::string()));
      }
      case Command::query:
        return reply_query(handler_.query(q));
      case Command::list:
        return reply_list(handler_.list(static_cast<std::size_t>(q.limit.value_or(32))));
    }
    return reply_error("unknown command");
  } catch (const bencode::DecodeError& e) {
    return reply_error(std::string("malformed message: ") + e.what());
  } catch (const Overloaded& e) {
    ++counters_.overloaded;
    if (request && std::find(request->supports.begin(), request->supports.end(), "load-limit") !=
                       request->supports.end())
      return {{"result", "load limit"}, {"message", e.what()}};
    return reply_error(kSessionLimit);
  } catch (const Refused& e) {
    return reply_error(e.what());
  } catch (const std::exception& e) {
    return reply_error(std::string("internal error: ") + e.what());
  }
}

std::optional<std::string> Processor::process(std::string_view datagram, std::string_view sender,
                                              ReplyCache::Clock::time_point now) {
  ++counters_.datagrams;
  const auto parts = split_datagram(datagram);
  if (!parts) {
    ++counters_.dropped;
    return std::nullopt;
  }
  std::string key(sender);
  key += ' ';
  key += parts->cookie;
  bool reused = false;
  if (const std::string* cached = cache_.find(key, parts->body, now, &reused)) {
    ++counters_.retransmissions;
    ++counters_.replies;
    return *cached;
  }
  if (reused) ++counters_.cookie_reused;  // not a retransmission: run it
  std::string what = "request";
  const bencode::Dict reply = execute(parts->body, what);
  const bool error = reply.at("result") == bencode::Value("error");
  if (error) ++counters_.errors;
  if (refusal_log_ && (error || reply.at("result") == bencode::Value("load limit"))) {
    const auto* reason = error ? reply.at("error-reason").string() : reply.at("message").string();
    refusal_log_(one_line(what + " from " + std::string(sender) +
                          " refused: " + (reason ? *reason : std::string("load limit"))));
  }
  std::string out = format_reply(parts->cookie, reply);
  cache_.insert(key, std::string(parts->body), out, now);
  ++counters_.replies;
  return out;
}

}  // namespace otpgate::ng
