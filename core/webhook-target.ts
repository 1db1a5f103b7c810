import { lookup as dnsLookup } from "node:dns/promises";
import { BlockList, isIP } from "node:net";
import ipaddr from "ipaddr.js";
import { InvalidInputError } from "./jobs.js";

// Where a webhook may go. A callback URL is the caller's choice, so without a check the
// service would POST wherever it is told: to its own Redis, a cloud metadata endpoint
// (169.254.169.254) or anything else on the internal network (SSRF). Only http(s) is
// allowed, the host is resolved, and every address it resolves to must be public,
// unless the configuration allows private ones. The check runs at Initiate (so a bad
// URL is refused at once) and again at each delivery, whose connection then goes to
// exactly the address that was checked: a name that resolves differently the second
// time (DNS rebinding) cannot slip through between the check and the connect.

export interface WebhookTargetPolicy {
  /** WEBHOOK_ALLOW_PRIVATE: private, loopback and link-local addresses are fine too. */
  allowPrivate: boolean;
  /** WEBHOOK_ALLOWED_HOSTS: host names, or CIDR ranges / single addresses, allowed although private. */
  allowedHosts: readonly string[];
}

export interface WebhookTarget {
  url: URL;
  /** The checked address the delivery connects to. */
  address: string;
  family: 4 | 6;
}

export type Lookup = (host: string) => Promise<{ address: string; family: number }[]>;

const defaultLookup: Lookup = (host) => dnsLookup(host, { all: true, verbatim: true });

const MAX_URL_LENGTH = 2048;

/** Addresses nobody outside the machine or its network should be made to call. */
const NOT_PUBLIC = new BlockList();
for (const [net, prefix] of [
  ["0.0.0.0", 8], // "this network"
  ["10.0.0.0", 8],
  ["100.64.0.0", 10], // carrier-grade NAT
  ["127.0.0.0", 8],
  ["169.254.0.0", 16], // link-local, cloud metadata
  ["172.16.0.0", 12],
  ["192.0.0.0", 24],
  ["192.0.2.0", 24], // documentation
  ["192.168.0.0", 16],
  ["198.18.0.0", 15], // benchmarking
  ["198.51.100.0", 24],
  ["203.0.113.0", 24],
  ["224.0.0.0", 4], // multicast
  ["240.0.0.0", 4], // reserved, broadcast
] as const) {
  NOT_PUBLIC.addSubnet(net, prefix, "ipv4");
}
// IPv6 forms that carry an IPv4 address (mapped, translated, compatible, the well-known
// NAT64 prefix, 6to4) are judged as that IPv4 address (embeddedIPv4() below): a rule for
// ::ffff:0:0/96 here would match every IPv4 address. Forms whose IPv4 part cannot be read
// reliably, or that reach a network nobody routes publicly, are refused outright.
for (const [net, prefix] of [
  ["::", 128],
  ["::1", 128],
  ["64:ff9b:1::", 48], // local-use NAT64 (RFC 8215): its IPv4 sits where the operator chose
  ["100::", 64], // discard
  ["2001::", 32], // Teredo: tunnels to an obfuscated IPv4 address behind a NAT
  ["2001:db8::", 32], // documentation
  ["fc00::", 7], // unique local
  ["fe80::", 10], // link-local
  ["fec0::", 10], // site-local (deprecated, still private where it is used)
  ["ff00::", 8], // multicast
] as const) {
  NOT_PUBLIC.addSubnet(net, prefix, "ipv6");
}

function familyOf(address: string): 4 | 6 {
  return isIP(address) === 6 ? 6 : 4;
}

function v4(hi: number, lo: number): string {
  return `${hi >> 8}.${hi & 0xff}.${lo >> 8}.${lo & 0xff}`;
}

/**
 * The IPv4 address an IPv6 address reaches or stands for, when it has one at a fixed
 * place: IPv4-mapped ::ffff:a.b.c.d, IPv4-translated ::ffff:0:a.b.c.d, IPv4-compatible
 * ::a.b.c.d (::7f00:1 is 127.0.0.1), the well-known NAT64 prefix 64:ff9b::/96 and 6to4
 * 2002:AABB:CCDD::/48 (the IPv4 address of its relay, AA.BB.CC.DD). Undefined otherwise.
 */
export function embeddedIPv4(address: string): string | undefined {
  if (isIP(address) !== 6) return undefined;
  let p: number[];
  try {
    p = ipaddr.IPv6.parse(address).parts;
  } catch {
    return undefined;
  }
  const [a = 0, b = 0, c = 0, d = 0, e = 0, f = 0, g = 0, h = 0] = p;
  const zeroTo = (n: number) => p.slice(0, n).every((x) => x === 0);
  if (zeroTo(5) && f === 0xffff) return v4(g, h); // mapped
  if (zeroTo(4) && e === 0xffff && f === 0) return v4(g, h); // translated (SIIT)
  if (zeroTo(6) && !(g === 0 && h <= 1)) return v4(g, h); // compatible; :: and ::1 are not
  if (a === 0x64 && b === 0xff9b && c === 0 && d === 0 && e === 0 && f === 0) return v4(g, h);
  if (a === 0x2002) return v4(b, c); // 6to4
  return undefined;
}

/** An IPv6 address as the IPv4 address it carries, if it carries one (embeddedIPv4). */
function unmapped(address: string): string {
  return embeddedIPv4(address) ?? address;
}

export function isPublicAddress(address: string): boolean {
  const a = unmapped(address);
  if (isIP(a) === 0) return false;
  return !NOT_PUBLIC.check(a, familyOf(a) === 6 ? "ipv6" : "ipv4");
}

function allowList(hosts: readonly string[]): { names: Set<string>; ranges: BlockList } {
  const names = new Set<string>();
  const ranges = new BlockList();
  for (const h of hosts) {
    const [net, bits] = h.split("/", 2);
    if (net !== undefined && isIP(net) !== 0) {
      const family = isIP(net) === 6 ? "ipv6" : "ipv4";
      const prefix = bits !== undefined ? Number(bits) : family === "ipv6" ? 128 : 32;
      ranges.addSubnet(net, prefix, family);
    } else {
      names.add(h.toLowerCase());
    }
  }
  return { names, ranges };
}

/**
 * Validates a callback URL and resolves its host; throws InvalidInputError saying what
 * is wrong. Every address the name has must be acceptable, not just the first: a
 * resolver may hand out any of them.
 */
export async function checkWebhookUrl(
  raw: string,
  policy: WebhookTargetPolicy,
  lookup: Lookup = defaultLookup,
): Promise<WebhookTarget> {
  if (raw.length > MAX_URL_LENGTH)
    throw new InvalidInputError(`callback_url is longer than ${MAX_URL_LENGTH} characters`);
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new InvalidInputError("callback_url is not a valid URL: expected https://host/path");
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") {
    throw new InvalidInputError(
      `callback_url must be http or https, not ${url.protocol.replace(/:$/, "")}`,
    );
  }
  if (url.username !== "" || url.password !== "") {
    throw new InvalidInputError(
      "callback_url must not carry a user name or password: verify the signature instead",
    );
  }
  const host = url.hostname.replace(/^\[|\]$/g, "").toLowerCase();
  const allowed = allowList(policy.allowedHosts);
  let addresses: { address: string; family: number }[];
  if (isIP(host) !== 0) {
    addresses = [{ address: host, family: isIP(host) }];
  } else {
    try {
      addresses = await lookup(host);
    } catch {
      throw new InvalidInputError(`callback_url host ${host} does not resolve`);
    }
    if (addresses.length === 0)
      throw new InvalidInputError(`callback_url host ${host} does not resolve`);
  }
  const nameAllowed = allowed.names.has(host);
  for (const { address } of addresses) {
    const a = unmapped(address);
    const ok =
      policy.allowPrivate ||
      nameAllowed ||
      isPublicAddress(a) ||
      allowed.ranges.check(a, familyOf(a) === 6 ? "ipv6" : "ipv4");
    if (!ok) {
      throw new InvalidInputError(
        `callback_url host ${host} resolves to a private, loopback or link-local address, which webhooks may not reach`,
      );
    }
  }
  const first = addresses[0] as { address: string };
  return { url, address: first.address, family: familyOf(first.address) };
}
