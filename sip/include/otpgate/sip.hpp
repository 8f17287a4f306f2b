// SPDX-License-Identifier: LGPL-2.1-or-later
// SIP media control for otp-gateway (issue 15), the parts below the gateway: a strict
// bencode codec, rtpengine's ng control protocol (cookie + bencoded dictionary over UDP,
// as Kamailio's and OpenSIPS's rtpengine modules send it), SDP parsing and rewriting per
// media section with the a=x-otp marker and the expected bit rate per media, and a UDP
// listener that hands ng commands to a handler. Nothing here knows the gateway; the
// gateway implements ng::Handler. See docs/sip.md.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <variant>
#include <vector>

namespace otpgate {

namespace bencode {

struct Value;
using List = std::vector<Value>;
using Dict = std::map<std::string, Value, std::less<>>;  // encoded with sorted keys

struct Value {
  std::variant<std::int64_t, std::string, List, Dict> v;

  Value() : v(std::int64_t{0}) {}
  Value(std::int64_t i) : v(i) {}  // NOLINT: implicit, so dictionaries read naturally
  Value(int i) : v(std::int64_t{i}) {}
  Value(std::string s) : v(std::move(s)) {}
  Value(std::string_view s) : v(std::string(s)) {}
  Value(const char* s) : v(std::string(s)) {}
  Value(List l) : v(std::move(l)) {}
  Value(Dict d) : v(std::move(d)) {}

  const std::int64_t* integer() const { return std::get_if<std::int64_t>(&v); }
  const std::string* string() const { return std::get_if<std::string>(&v); }
  const List* list() const { return std::get_if<List>(&v); }
  const Dict* dict() const { return std::get_if<Dict>(&v); }
  bool operator==(const Value&) const = default;
};

struct Limits {
  std::size_t max_depth = 32;            // nested lists/dictionaries
  std::size_t max_input = 256 * 1024;    // bytes of input
  std::size_t max_elements = 64 * 1024;  // values in all, at any depth
};

// What a malformed input is: a message naming what was expected and the byte offset.
class DecodeError : public std::runtime_error {
 public:
  DecodeError(const std::string& what, std::size_t offset);
  std::size_t offset() const { return offset_; }

 private:
  std::size_t offset_;
};

// Exactly one value filling `text`. Strict: canonical integers (no "-0", no leading zeros,
// int64 range), canonical string lengths, no duplicate dictionary keys, nothing after the
// value. Dictionary keys may come unsorted (Kamailio and rtpengine do not sort them).
Value decode(std::string_view text, const Limits& limits = {});
std::string encode(const Value& value);

}  // namespace bencode

namespace ng {

enum class Command { ping, offer, answer, remove /* "delete" */, query, list };
std::string_view command_name(Command command);

// One ng request, typed. Keys are matched with spaces and hyphens as equals ("received
// from" is "received-from"), as rtpengine does; so are flags, which are kept with hyphens.
struct Request {
  Command command = Command::ping;
  std::string call_id, from_tag, to_tag, via_branch;
  std::string sdp;                     // offer, answer
  std::vector<std::string> flags;      // "trust-address", "SIP-source-address", ...
  std::vector<std::string> replace;    // "origin", "session-connection", ...
  std::vector<std::string> direction;  // logical interfaces, e.g. {"internal", "external"}
  std::vector<std::string> rtcp_mux;   // "demux", "accept", "offer", "require", "reject"
  std::vector<std::string> supports;   // "load-limit"
  std::vector<std::string> osrtp;      // "offer", "accept", ...: the OSRTP key and OSRTP-... flags
  std::string ice;                     // "remove", "force", "default", ... (empty: absent)
  std::string transport_protocol;      // "RTP/AVP", ... (empty: absent)
  std::string address_family;          // "IP4", "IP6" (empty: absent)
  std::string received_from_family, received_from_address;  // SIP source (empty: absent)
  std::string sip_message_type;       // "sip-request", "sip-reply" (newer Kamailio)
  std::optional<std::int64_t> limit;  // list
  std::optional<std::int64_t> delete_delay;
  bencode::Dict dict;  // the request as received, for keys not typed here

  bool has_flag(std::string_view flag) const;  // spaces or hyphens
};

// Why a request is refused: the reply's error-reason.
class Refused : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An offer refused because this instance is full (no session, lane or port left), with
// what is exhausted. Answered so that the proxy tries the next instance of its set:
// `result: load limit` with this as `message` to a proxy that announces `supports: load
// limit` (Kamailio), else `result: error` with exactly kSessionLimit as error-reason, the
// only reason Kamailio's module moves on for (it compares the whole string).
class Overloaded : public Refused {
 public:
  using Refused::Refused;
};
inline constexpr std::string_view kSessionLimit = "Parallel session limit reached";

// The request dictionary of a datagram (after the cookie). Throws Refused for a dictionary
// that is not a valid request (unknown command, missing call-id, wrong types).
Request parse_request(const bencode::Value& dict);

// A datagram split at its first space: cookie and body. nullopt when there is no cookie
// (no space, or an empty or over-long cookie, or a control character in it): no reply can
// be matched to such a datagram, so none is sent.
struct Datagram {
  std::string_view cookie, body;
};
std::optional<Datagram> split_datagram(std::string_view datagram);

bencode::Dict reply_pong();
bencode::Dict reply_ok(std::string_view sdp = {}, std::string_view warning = {});
bencode::Dict reply_error(std::string_view reason);
std::string format_reply(std::string_view cookie, const bencode::Dict& reply);

// query: what rtpengine's reply carries, as far as the gateway knows it.
struct StreamStats {
  std::uint16_t local_port = 0;
  std::string endpoint_address;  // where media goes ("" when not known yet)
  std::uint16_t endpoint_port = 0;
  bool rtcp = false;
  std::uint64_t packets = 0, bytes = 0, errors = 0;
  std::int64_t last_packet = 0;  // UNIX seconds, 0: none yet
};
struct MediaStats {
  std::string type;      // audio, video, application
  std::string protocol;  // RTP/AVP, ...
  std::vector<StreamStats> streams;
};
struct TagStats {
  std::string tag, in_dialogue_with;
  std::int64_t created = 0;
  std::vector<MediaStats> medias;
};
struct QueryResult {
  std::int64_t created = 0, last_signal = 0;  // UNIX seconds
  std::vector<TagStats> tags;
};
bencode::Dict reply_query(const QueryResult& result);
bencode::Dict reply_list(const std::vector<std::string>& call_ids);

// What the gateway does per command. Throw Refused to answer result: error with that
// reason; any other exception answers "internal error: ..." (and the listener goes on).
class Handler {
 public:
  virtual ~Handler() = default;
  virtual std::string offer(const Request& request) = 0;   // the rewritten SDP
  virtual std::string answer(const Request& request) = 0;  // the rewritten SDP
  // delete; a warning (e.g. "unknown call") answers ok with it, as rtpengine does.
  virtual std::optional<std::string> remove(const Request& request) = 0;
  virtual QueryResult query(const Request& request) = 0;
  virtual std::vector<std::string> list(std::size_t limit) = 0;
};

// Replies by (sender, cookie), so a retransmitted request gets the identical reply and is
// not executed twice. A retransmission is the same bytes: a request that reuses a cached
// cookie with another body (a restarted proxy whose new process counts its cookies from
// the start again) is not one, and is run. Bounded in entries, bytes and age (Kamailio
// retransmits within seconds).
class ReplyCache {
 public:
  using Clock = std::chrono::steady_clock;
  explicit ReplyCache(std::size_t max_entries = 4096,
                      Clock::duration max_age = std::chrono::seconds(60),
                      std::size_t max_bytes = 32u << 20)
      : max_entries_(max_entries), max_age_(max_age), max_bytes_(max_bytes) {}
  // The reply sent for this key, if it is still held and was sent for these request bytes.
  // `reused` (if given) tells whether the key is held for another request.
  const std::string* find(const std::string& key, std::string_view request, Clock::time_point now,
                          bool* reused = nullptr);
  void insert(const std::string& key, std::string request, std::string reply,
              Clock::time_point now);
  std::size_t size() const { return replies_.size(); }

 private:
  struct Entry {
    std::string request, reply;
    Clock::time_point at;
  };
  void expire(Clock::time_point now);
  void erase(const std::string& key);
  std::size_t max_entries_;
  Clock::duration max_age_;
  std::size_t max_bytes_, bytes_ = 0;
  std::unordered_map<std::string, Entry> replies_;
  std::deque<std::pair<Clock::time_point, std::string>> order_;  // oldest first
};

struct Counters {
  std::atomic<std::uint64_t> datagrams{0}, replies{0}, retransmissions{0}, errors{0},
      dropped{0} /* no cookie: nothing to answer */,
      overloaded{0} /* offers refused as "load limit" / kSessionLimit */,
      cookie_reused{0} /* a cached cookie with another request: run, not answered from cache */,
      unlisted{0} /* from a source not among the clients: no reply */;
};

// One datagram in, the reply datagram out (nullopt: none). `sender` names the source
// address for the reply cache. Never throws for what a datagram holds.
class Processor {
 public:
  explicit Processor(Handler& handler, bencode::Limits limits = {})
      : handler_(handler), limits_(limits) {}
  std::optional<std::string> process(std::string_view datagram, std::string_view sender,
                                     ReplyCache::Clock::time_point now);
  // Called with one line (no newline) for every request answered with an error or "load
  // limit": "offer for call X from 127.0.0.1:5060 refused: <error-reason>" (never the SDP).
  void set_refusal_log(std::function<void(const std::string&)> log) {
    refusal_log_ = std::move(log);
  }
  const Counters& counters() const { return counters_; }
  std::atomic<std::uint64_t>& unlisted() { return counters_.unlisted; }

 private:
  // `what` gets "offer for call X" once the request parsed.
  bencode::Dict execute(std::string_view body, std::string& what);
  Handler& handler_;
  std::function<void(const std::string&)> refusal_log_;
  bencode::Limits limits_;
  ReplyCache cache_;
  Counters counters_;
};

// Who may send ng commands: loopback sources (127.0.0.0/8, ::1) when `loopback`, and the
// numeric addresses listed (an IPv4-mapped IPv6 source counts as its IPv4 address).
struct Clients {
  bool loopback = true;
  std::vector<std::string> addresses;
  bool allows(std::string_view address) const;
};
// An IPv4-mapped IPv6 address ("::ffff:10.0.0.2") as IPv4; others as they are.
std::string plain_address(std::string_view address);
// A numeric loopback address: 127.0.0.0/8 (also IPv4-mapped) or ::1.
bool is_loopback_address(std::string_view address);

struct ListenerOptions {
  Clients clients;
  // One line (no newline) about a datagram from a source that is not a client (at most
  // once per source every 10 minutes, and at most 10 lines a minute in all), and about
  // each request a client sent that was refused (Processor::set_refusal_log).
  std::function<void(const std::string&)> log;
};

// The ng control socket: a UDP socket on a numeric address (IPv4 or IPv6, port 0 picks
// one) and a thread that answers each datagram in turn through a Processor. Datagrams
// from sources that are not clients get no reply and are counted (`unlisted`). Stops and
// joins in its destructor.
class Listener {
 public:
  Listener(Handler& handler, const std::string& address, std::uint16_t port,
           ListenerOptions options = {});
  ~Listener();
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  std::uint16_t port() const;
  const Counters& counters() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ng

namespace sdp {

class ParseError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One "x=value" line, kept as received (the value without "x=").
struct Line {
  char type;
  std::string value;
  bool operator==(const Line&) const = default;
};

struct Connection {
  std::string addr_type;  // IP4, IP6
  std::string address;
  bool zero() const;  // 0.0.0.0 or :: (on hold, RFC 2543 style)
};

enum class Direction { sendrecv, sendonly, recvonly, inactive };

struct Media {
  std::string type;  // audio, video, application, ...
  std::uint16_t port = 0;
  std::string port_count;  // "/2" suffix kept as text ("" without)
  std::string proto;       // RTP/AVP, RTP/SAVPF, UDP/TLS/RTP/SAVPF, TCP/BFCP, ...
  std::vector<std::string> formats;
  std::vector<Line> lines;  // the lines after m=, in order

  bool rejected() const { return port == 0; }
  bool rtp() const;  // an RTP profile (RTP/... or UDP/TLS/RTP/...)
};

struct Session {
  std::vector<Line> lines;  // v= o= s= ... up to the first m=
  std::vector<Media> media;
};

// Parses SDP (CRLF or LF line ends). Checks what rewriting relies on: v=0 first, o= and
// s= present, m= and c= lines well formed, a port in 0-65535, no NUL; other lines are kept
// as they are. Throws ParseError naming the line.
Session parse(std::string_view text, std::size_t max_bytes = 64 * 1024);
std::string format(const Session& session);  // CRLF line ends

// The connection that applies to a media section (its own c=, else the session's).
std::optional<Connection> connection(const Session& session, const Media& media);
Direction direction(const Session& session, const Media& media);
// The SAE named by a=x-otp (media level, else session level).
std::optional<std::string> otp_sae(const Session& session, const Media& media);
// Values of a=NAME[:value] at media level ("" for a flag attribute).
std::vector<std::string> attributes(const Media& media, std::string_view name);

// Where the gateway receives a media section's RTP (and RTCP, unless multiplexed).
struct MediaPorts {
  std::uint16_t rtp = 0;
  std::optional<std::uint16_t> rtcp;  // nullopt: no a=rtcp (rtcp-mux)
};
struct Rewrite {
  std::string address;            // the gateway's numeric address towards this leg
  std::vector<MediaPorts> ports;  // one per m= line (ignored for rejected ones)
  bool strip_ice = false;
  bool replace_origin = false;         // o= address too
  std::optional<std::string> otp_sae;  // add a=x-otp:<sae> to each accepted media
  bool remove_otp = false;             // drop any a=x-otp (towards a local endpoint)
};
// Rewrites c=, m= ports and a=rtcp to the gateway; zero (hold) addresses, codecs, b=
// lines and direction attributes are kept. Throws std::invalid_argument for options that
// do not fit the session (ports count, an empty address, an unusable SAE ID).
Session rewrite(Session session, const Rewrite& options);

// The bit rate a media section is expected to carry, for key-budget admission.
struct Bitrate {
  enum class Source { tias, as, codec, none };
  std::uint64_t bits_per_second = 0;
  Source source = Source::none;
  std::string codec;  // the codec the default came from
};
// b=TIAS, else b=AS (kbit/s), else the highest default among the offered codecs (table in
// docs/sip.md). Rejected and non-RTP media: 0.
Bitrate expected_bitrate(const Media& media);
// A codec's default rate in bit/s (encoding name case-insensitive); nullopt if unknown.
std::optional<std::uint64_t> codec_bitrate(std::string_view media_type, std::string_view encoding);
// The encoding name of payload type `pt`, lower case: "opus" from a=rtpmap:111 opus/48000/2,
// RFC 3551's name for a static type without a=rtpmap ("0": "pcmu"); empty if unknown.
std::string encoding_of(const Media& media, std::string_view pt);

}  // namespace sdp

}  // namespace otpgate
