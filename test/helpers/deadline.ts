/**
 * `p`'s outcome, or an error naming `what` when it has not settled within `ms`. For
 * catching a hang with a clear message: `ms` is far above what a busy machine needs,
 * because how fast something happens is a benchmark's question, not a test's.
 */
export async function settlesWithin<T>(what: string, ms: number, p: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: still pending after ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, hang]);
  } finally {
    clearTimeout(timer);
  }
}
