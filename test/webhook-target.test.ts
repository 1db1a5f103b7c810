import { describe, expect, test } from "vitest";
import { InvalidInputError } from "../core/jobs.js";
import { checkWebhookUrl, embeddedIPv4, isPublicAddress } from "../core/webhook-target.js";

// The webhook address check against IPv6 spellings that embed or reach IPv4 space: each
// is either refused outright or judged by the IPv4 address it carries, so a callback URL
// cannot reach 127.0.0.1 or 10.0.0.0/8 by writing it the IPv6 way.

const policy = { allowPrivate: false, allowedHosts: [] };

// [address, public?, what it is]
const ADDRESSES: [string, boolean, string][] = [
  ["93.184.215.14", true, "public IPv4"],
  ["10.0.0.5", false, "private IPv4"],
  ["2606:4700::6810:84e5", true, "public IPv6"],
  ["::", false, "unspecified"],
  ["::1", false, "loopback"],
  // IPv4-mapped ::ffff:a.b.c.d
  ["::ffff:127.0.0.1", false, "mapped loopback"],
  ["::ffff:7f00:1", false, "mapped loopback, hex"],
  ["::ffff:10.1.2.3", false, "mapped private"],
  ["::ffff:8.8.8.8", true, "mapped public"],
  // IPv4-compatible ::a.b.c.d (deprecated)
  ["::7f00:1", false, "compatible loopback"],
  ["::127.0.0.1", false, "compatible loopback, dotted"],
  ["::a9fe:a9fe", false, "compatible metadata 169.254.169.254"],
  ["::c0a8:101", false, "compatible 192.168.1.1"],
  ["::808:808", true, "compatible 8.8.8.8"],
  // IPv4-translated ::ffff:0:a.b.c.d (SIIT)
  ["::ffff:0:7f00:1", false, "translated loopback"],
  ["::ffff:0:10.0.0.1", false, "translated private"],
  ["::ffff:0:808:808", true, "translated public"],
  // 6to4 2002:AABB:CCDD::/48, judged by the relay's IPv4 address
  ["2002:7f00:1::1", false, "6to4 of 127.0.0.1"],
  ["2002:a00:1::", false, "6to4 of 10.0.0.1"],
  ["2002:c0a8:101:0:1::5", false, "6to4 of 192.168.1.1"],
  ["2002:808:808::1", true, "6to4 of 8.8.8.8"],
  // NAT64: the well-known prefix by its IPv4 address, the local-use prefix refused
  ["64:ff9b::7f00:1", false, "well-known NAT64 of 127.0.0.1"],
  ["64:ff9b::10.0.0.1", false, "well-known NAT64 of 10.0.0.1"],
  ["64:ff9b::808:808", true, "well-known NAT64 of 8.8.8.8"],
  ["64:ff9b:1::808:808", false, "local-use NAT64 (RFC 8215)"],
  ["64:ff9b:1:abcd::a00:1", false, "local-use NAT64, other layout"],
  // Teredo 2001::/32, refused
  ["2001:0:4136:e378:8000:63bf:3fff:fdd2", false, "Teredo"],
  ["2001::1", false, "Teredo prefix"],
  // site-local fec0::/10 (deprecated), refused
  ["fec0::1", false, "site-local"],
  ["feff:ffff::1", false, "site-local, top of range"],
  // the rest of the private IPv6 space
  ["fd00::1", false, "unique local"],
  ["fe80::1", false, "link-local"],
  ["ff02::1", false, "multicast"],
  ["2001:db8::1", false, "documentation"],
  ["100::1", false, "discard"],
];

describe("webhook target addresses", () => {
  test.each(ADDRESSES)("%s is public: %s (%s)", (address, expected) => {
    expect(isPublicAddress(address)).toBe(expected);
  });

  test.each(ADDRESSES)("a URL with [%s] is accepted: %s (%s)", async (address, expected) => {
    const host = address.includes(":") ? `[${address}]` : address;
    const check = checkWebhookUrl(`https://${host}/hook`, policy);
    if (expected) await expect(check).resolves.toBeDefined();
    else await expect(check).rejects.toBeInstanceOf(InvalidInputError);
  });

  test.each(ADDRESSES)("a name resolving to %s is accepted: %s (%s)", async (address, expected) => {
    const lookup = async () => [{ address, family: address.includes(":") ? 6 : 4 }];
    const check = checkWebhookUrl("https://hooks.example/x", policy, lookup);
    if (expected) await expect(check).resolves.toBeDefined();
    else
      await expect(check).rejects.toThrow(/resolves to a private, loopback or link-local address/);
  });

  test.each([
    ["::ffff:10.1.2.3", "10.1.2.3"],
    ["::7f00:1", "127.0.0.1"],
    ["::ffff:0:a00:1", "10.0.0.1"],
    ["2002:c0a8:101::", "192.168.1.1"],
    ["64:ff9b::a9fe:a9fe", "169.254.169.254"],
    ["::1", undefined],
    ["::", undefined],
    ["2606:4700::6810:84e5", undefined],
    ["10.0.0.1", undefined],
  ])("%s carries the IPv4 address %s", (address, ipv4) => {
    expect(embeddedIPv4(address)).toBe(ipv4);
  });

  test("an allowed range covers the IPv6 spellings of its addresses", async () => {
    const allow = { allowPrivate: false, allowedHosts: ["10.0.0.0/8"] };
    for (const host of ["[::ffff:10.0.0.5]", "[::a00:5]", "[2002:a00:5::1]", "[64:ff9b::a00:5]"]) {
      await expect(checkWebhookUrl(`https://${host}/x`, allow), host).resolves.toBeDefined();
    }
    await expect(checkWebhookUrl("https://[::7f00:1]/x", allow)).rejects.toBeInstanceOf(
      InvalidInputError,
    );
  });
});
