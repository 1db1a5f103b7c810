/**
 * A signed token or signature with one character changed well inside its last part.
 * Changing its last characters is not enough: a base64url string's last character can
 * carry bits the decoder drops, so the altered text can decode to the same bytes (a CI
 * run once handed a tampered page token back as good). '0' and '1' are valid in hex and
 * base64url alike.
 */
export function tamper(signed: string): string {
  const i = signed.length - 5;
  if (i < 0) throw new Error(`too short to tamper with: ${signed}`);
  return `${signed.slice(0, i)}${signed[i] === "0" ? "1" : "0"}${signed.slice(i + 1)}`;
}
