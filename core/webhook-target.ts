import { lookup as dnsLookup } from "node:dns/promises";
import { BlockList, isIP } from "node:net";
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
// IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are judged as the IPv4 address they
// carry (unmapped() below); a ::ffff:0:0/96 rule here would match every IPv4 address.
for (const [net, prefix] of [
  ["::", 128],
  ["::1", 128],
  ["64:ff9b::", 96], // NAT64 can reach private IPv4
  ["100::", 64], // discard
  ["2001:db8::", 32], // documentation
  ["fc00::", 7], // unique local
  ["fe80::", 10], // link-local
  ["ff00::", 8], // multicast
] as const) {
  NOT_PUBLIC.addSubnet(net, prefix, "ipv6");
}

function familyOf(address: string): 4 | 6 {
  return isIP(address) === 6 ? 6 : 4;
}

/** An IPv4-mapped IPv6 address (::ffff:10.0.0.1) as the IPv4 address it is. */
function unmapped(address: string): string {
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  return m?.[1] ?? address;
}

export function isPublicAddress(address: string): boolean {
  const a = unmapped(address);
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
