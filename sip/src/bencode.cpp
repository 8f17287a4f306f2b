// SPDX-License-Identifier: LGPL-2.1-or-later
// A strict bencode codec (Debian 12 has no maintained C++ one): integers, byte strings,
// lists and dictionaries, decoded with depth, size and element limits, encoded with
// sorted dictionary keys.
#include <charconv>
#include <limits>

#include "otpgate/sip.hpp"

namespace otpgate::bencode {

DecodeError::DecodeError(const std::string& what, std::size_t offset)
    : std::runtime_error("bencode: " + what + " at byte " + std::to_string(offset)),
      offset_(offset) {}

namespace {

bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

class Decoder {
 public:
  Decoder(std::string_view text, const Limits& limits) : text_(text), limits_(limits) {}

  Value whole() {
    if (text_.size() > limits_.max_input) {
      throw DecodeError("input of " + std::to_string(text_.size()) +
                            " bytes is over the limit of " + std::to_string(limits_.max_input),
                        0);
    }
    if (text_.empty()) throw DecodeError("empty input", 0);
    Value value = next(0);
    if (pos_ != text_.size()) throw DecodeError("data after the value", pos_);
    return value;
  }

 private:
  char peek() const {
    if (pos_ >= text_.size()) throw DecodeError("input ends inside a value", pos_);
    return text_[pos_];
  }

  Value next(std::size_t depth) {
    if (++elements_ > limits_.max_elements) {
      throw DecodeError("more than " + std::to_string(limits_.max_elements) + " values", pos_);
    }
    const char c = peek();
    if (c == 'i') return Value(integer());
    if (is_digit(c)) return Value(string());
    if (c == 'l' || c == 'd') {
      if (depth >= limits_.max_depth) {
        throw DecodeError("nested deeper than " + std::to_string(limits_.max_depth), pos_);
      }
      ++pos_;
      return c == 'l' ? Value(list(depth + 1)) : Value(dict(depth + 1));
    }
    throw DecodeError(std::string("unexpected ") + shown(c) + " where a value starts", pos_);
  }

  static std::string shown(char c) {
    if (c >= 0x21 && c < 0x7f) return std::string("'") + c + "'";
    return "byte " + std::to_string(static_cast<unsigned char>(c));
  }

  // Digits up to `end`, canonical (no leading zero unless "0"), as an unsigned magnitude.
  std::uint64_t digits(char end, const char* what) {
    const std::size_t start = pos_;
    while (pos_ < text_.size() && is_digit(text_[pos_])) ++pos_;
    if (pos_ == start) throw DecodeError(std::string(what) + " without digits", start);
    if (text_[start] == '0' && pos_ - start > 1) {
      throw DecodeError(std::string(what) + " with a leading zero", start);
    }
    if (peek() != end) {
      throw DecodeError(
          std::string(what) + " ends with " + shown(text_[pos_]) + ", not '" + end + "'", pos_);
    }
    std::uint64_t n = 0;
    const auto [ptr, ec] = std::from_chars(text_.data() + start, text_.data() + pos_, n);
    if (ec != std::errc() || ptr != text_.data() + pos_) {
      throw DecodeError(std::string(what) + " out of range", start);
    }
    ++pos_;  // the end character
    return n;
  }

  std::int64_t integer() {
    const std::size_t start = pos_++;  // 'i'
    const bool negative = peek() == '-';
    if (negative) ++pos_;
    const std::uint64_t magnitude = digits('e', "integer");
    constexpr auto max = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    if (negative) {
      if (magnitude == 0) throw DecodeError("integer -0", start);
      if (magnitude > max + 1) throw DecodeError("integer below the 64-bit range", start);
      return magnitude == max + 1 ? std::numeric_limits<std::int64_t>::min()
                                  : -static_cast<std::int64_t>(magnitude);
    }
    if (magnitude > max) throw DecodeError("integer above the 64-bit range", start);
    return static_cast<std::int64_t>(magnitude);
  }

  std::string string() {
    const std::size_t start = pos_;
    const std::uint64_t length = digits(':', "string length");
    if (length > text_.size() - pos_) {
      throw DecodeError("string of " + std::to_string(length) + " bytes runs past the input",
                        start);
    }
    std::string s(text_.substr(pos_, length));
    pos_ += length;
    return s;
  }

  List list(std::size_t depth) {
    List items;
    while (peek() != 'e') items.push_back(next(depth));
    ++pos_;
    return items;
  }

  Dict dict(std::size_t depth) {
    Dict entries;
    while (peek() != 'e') {
      const std::size_t at = pos_;
      if (!is_digit(peek())) throw DecodeError("dictionary key is not a string", at);
      ++elements_;
      std::string key = string();
      if (entries.contains(key)) throw DecodeError("duplicate dictionary key \"" + key + '"', at);
      Value value = next(depth);
      entries.emplace(std::move(key), std::move(value));
    }
    ++pos_;
    return entries;
  }

  std::string_view text_;
  const Limits& limits_;
  std::size_t pos_ = 0;
  std::size_t elements_ = 0;
};

void encode_string(std::string& out, std::string_view s) {
  out += std::to_string(s.size());
  out += ':';
  out += s;
}

void encode_to(std::string& out, const Value& value) {
  if (const auto* i = value.integer()) {
    out += 'i';
    out += std::to_string(*i);
    out += 'e';
  } else if (const auto* s = value.string()) {
    encode_string(out, *s);
  } else if (const auto* l = value.list()) {
    out += 'l';
    for (const auto& item : *l) encode_to(out, item);
    out += 'e';
  } else if (const auto* d = value.dict()) {
    out += 'd';
    for (const auto& [key, item] : *d) {  // std::map: sorted by raw bytes, as bencode wants
      encode_string(out, key);
      encode_to(out, item);
    }
    out += 'e';
  }
}

}  // namespace

Value decode(std::string_view text, const Limits& limits) {
  return Decoder(text, limits).whole();
}

std::string encode(const Value& value) {
  std::string out;
  encode_to(out, value);
  return out;
}

}  // namespace otpgate::bencode
