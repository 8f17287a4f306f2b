// SPDX-License-Identifier: LGPL-2.1-or-later
// The bencode codec: known encodings both ways, strictness, limits.
#include <gtest/gtest.h>

#include <string>

#include "otpgate/sip.hpp"

namespace bencode = otpgate::bencode;
using bencode::Dict;
using bencode::List;
using bencode::Value;

namespace {

std::string decode_error(std::string_view text, const bencode::Limits& limits = {}) {
  try {
    bencode::decode(text, limits);
  } catch (const bencode::DecodeError& e) {
    return e.what();
  }
  return "decoded";
}

}  // namespace

TEST(Bencode, KnownEncodings) {
  EXPECT_EQ(bencode::encode(Value(0)), "i0e");
  EXPECT_EQ(bencode::encode(Value(-42)), "i-42e");
  EXPECT_EQ(bencode::encode(Value(std::int64_t{9223372036854775807})), "i9223372036854775807e");
  EXPECT_EQ(bencode::encode(Value(INT64_MIN)), "i-9223372036854775808e");
  EXPECT_EQ(bencode::encode(Value("spam")), "4:spam");
  EXPECT_EQ(bencode::encode(Value("")), "0:");
  EXPECT_EQ(bencode::encode(Value(List{"spam", "eggs"})), "l4:spam4:eggse");
  EXPECT_EQ(bencode::encode(Value(List{})), "le");
  EXPECT_EQ(bencode::encode(Value(Dict{})), "de");
  // Keys come out sorted by their bytes, whatever order they were added in.
  EXPECT_EQ(bencode::encode(Value(Dict{{"spam", List{"a", "b"}}, {"cow", "moo"}})),
            "d3:cow3:moo4:spaml1:a1:bee");
  EXPECT_EQ(bencode::encode(Value(Dict{{"b", 1}, {"B", 2}, {"a", 3}})), "d1:Bi2e1:ai3e1:bi1ee");
  // rtpengine's documented ping and pong.
  EXPECT_EQ(bencode::encode(Value(Dict{{"command", "ping"}})), "d7:command4:pinge");
  EXPECT_EQ(bencode::encode(Value(Dict{{"result", "pong"}})), "d6:result4:ponge");
}

TEST(Bencode, DecodesKnownEncodings) {
  EXPECT_EQ(bencode::decode("i3e"), Value(3));
  EXPECT_EQ(bencode::decode("i-3e"), Value(-3));
  EXPECT_EQ(bencode::decode("i-9223372036854775808e"), Value(INT64_MIN));
  EXPECT_EQ(bencode::decode("4:spam"), Value("spam"));
  EXPECT_EQ(bencode::decode("0:"), Value(""));
  EXPECT_EQ(bencode::decode("l4:spami42ee"), Value(List{"spam", 42}));
  EXPECT_EQ(bencode::decode("d3:cow3:moo4:spam4:eggse"),
            Value(Dict{{"cow", "moo"}, {"spam", "eggs"}}));
  // Byte strings hold any bytes, NUL and CRLF included.
  EXPECT_EQ(bencode::decode(std::string_view("5:a\0\r\nb", 7)), Value(std::string("a\0\r\nb", 5)));
}

TEST(Bencode, AcceptsUnsortedKeysAsKamailioSendsThem) {
  // Kamailio's rtpengine module adds keys in the order it builds them (sdp before
  // call-id before command); rtpengine accepts that, so must we.
  const Value v = bencode::decode("d3:sdp3:v=07:call-id2:c17:command5:offere");
  EXPECT_EQ(v, Value(Dict{{"sdp", "v=0"}, {"call-id", "c1"}, {"command", "offer"}}));
  EXPECT_EQ(bencode::encode(v), "d7:call-id2:c17:command5:offer3:sdp3:v=0e");
}

TEST(Bencode, RoundTripsNestedValues) {
  const Value v(Dict{{"tags", Dict{{"t1", Dict{{"medias", List{Dict{{"index", 1}}}}}}}},
                     {"totals", List{List{}, Dict{}, -1, ""}}});
  EXPECT_EQ(bencode::decode(bencode::encode(v)), v);
}

TEST(Bencode, RefusesMalformedInputWithAClearError) {
  EXPECT_EQ(decode_error(""), "bencode: empty input at byte 0");
  EXPECT_EQ(decode_error("i-0e"), "bencode: integer -0 at byte 0");
  EXPECT_EQ(decode_error("i03e"), "bencode: integer with a leading zero at byte 1");
  EXPECT_EQ(decode_error("ie"), "bencode: integer without digits at byte 1");
  EXPECT_EQ(decode_error("i-e"), "bencode: integer without digits at byte 2");
  EXPECT_EQ(decode_error("i1"), "bencode: input ends inside a value at byte 2");
  EXPECT_EQ(decode_error("i1x"), "bencode: integer ends with 'x', not 'e' at byte 2");
  EXPECT_EQ(decode_error("i9223372036854775808e"),
            "bencode: integer above the 64-bit range at byte 0");
  EXPECT_EQ(decode_error("i-9223372036854775809e"),
            "bencode: integer below the 64-bit range at byte 0");
  EXPECT_EQ(decode_error("i99999999999999999999999e"), "bencode: integer out of range at byte 1");
  EXPECT_EQ(decode_error("04:spam"), "bencode: string length with a leading zero at byte 0");
  EXPECT_EQ(decode_error("5:spam"), "bencode: string of 5 bytes runs past the input at byte 0");
  EXPECT_EQ(decode_error("99999999999999999999:x"),
            "bencode: string length out of range at byte 0");
  EXPECT_EQ(decode_error("4spam"), "bencode: string length ends with 's', not ':' at byte 1");
  EXPECT_EQ(decode_error("l4:spam"), "bencode: input ends inside a value at byte 7");
  EXPECT_EQ(decode_error("di1e3:fooe"), "bencode: dictionary key is not a string at byte 1");
  EXPECT_EQ(decode_error("d1:ai1e1:ai2ee"), "bencode: duplicate dictionary key \"a\" at byte 7");
  EXPECT_EQ(decode_error("d1:ae"), "bencode: unexpected 'e' where a value starts at byte 4");
  EXPECT_EQ(decode_error("i1ei2e"), "bencode: data after the value at byte 3");
  EXPECT_EQ(decode_error("x"), "bencode: unexpected 'x' where a value starts at byte 0");
  EXPECT_EQ(decode_error(std::string_view("\0", 1)),
            "bencode: unexpected byte 0 where a value starts at byte 0");
}

TEST(Bencode, EnforcesLimits) {
  bencode::Limits limits;
  limits.max_depth = 3;
  EXPECT_EQ(bencode::decode("llleee", limits), Value(List{List{List{}}}));
  EXPECT_EQ(decode_error("lllleeee", limits), "bencode: nested deeper than 3 at byte 3");
  // The default depth stops a datagram of nested lists long before the stack could.
  EXPECT_EQ(decode_error(std::string(5000, 'l') + std::string(5000, 'e')),
            "bencode: nested deeper than 32 at byte 32");
  limits = {};
  limits.max_input = 8;
  EXPECT_EQ(decode_error("9:123456789", limits),
            "bencode: input of 11 bytes is over the limit of 8 at byte 0");
  limits = {};
  limits.max_elements = 3;
  EXPECT_EQ(bencode::decode("li1ei2ee", limits), Value(List{1, 2}));
  EXPECT_EQ(decode_error("li1ei2ei3ee", limits), "bencode: more than 3 values at byte 7");
}
