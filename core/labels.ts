import { InvalidInputError } from "./jobs.js";

// Labels: a small map of the caller's own on a job (an order id, a team), to find and
// filter their jobs by. The limits keep a record small and a label safe to show, log
// and put in a URL query: each violation is refused with the label it concerns.

export const MAX_LABELS = 16;
export const MAX_LABEL_KEY_CHARS = 63;
export const MAX_LABEL_VALUE_CHARS = 128;

const KEY = /^[a-z][a-z0-9_-]*$/;
const VALUE = /^[A-Za-z0-9_.:@/-]*$/;

export type Labels = Readonly<Record<string, string>>;

const shown = (s: string) => JSON.stringify(s.length > 40 ? `${s.slice(0, 40)}…` : s);

/**
 * Validates labels from a request (`field` names them in errors: "labels") and returns
 * them with their keys sorted, so that equal maps encode equally (params hash, JSON).
 */
export function parseLabels(raw: Readonly<Record<string, string>>, field = "labels"): Labels {
  const keys = Object.keys(raw).sort();
  if (keys.length > MAX_LABELS) {
    throw new InvalidInputError(
      `${field} has ${keys.length} entries: at most ${MAX_LABELS} labels fit on a job`,
    );
  }
  const out: Record<string, string> = {};
  for (const key of keys) {
    const value = raw[key] ?? "";
    if (key.length === 0 || key.length > MAX_LABEL_KEY_CHARS) {
      throw new InvalidInputError(
        `${field}: key ${shown(key)} has ${key.length} characters: keys have 1 to ${MAX_LABEL_KEY_CHARS}`,
      );
    }
    if (!KEY.test(key)) {
      throw new InvalidInputError(
        `${field}: key ${shown(key)} is not allowed: keys start with a lower-case letter and hold only lower-case letters, digits, '_' and '-'`,
      );
    }
    if (value.length > MAX_LABEL_VALUE_CHARS) {
      throw new InvalidInputError(
        `${field}[${key}]: the value has ${value.length} characters: at most ${MAX_LABEL_VALUE_CHARS}`,
      );
    }
    if (!VALUE.test(value)) {
      throw new InvalidInputError(
        `${field}[${key}]: the value ${shown(value)} is not allowed: values hold only letters, digits and '_' '-' '.' ':' '@' '/'`,
      );
    }
    out[key] = value;
  }
  return out;
}
