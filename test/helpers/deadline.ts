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

/**
 * How long a test gives a service it starts as a child process (tsx compiling the entry,
 * connecting to Redis and S3) to come up. Seconds on an idle machine; a run that shares
 * two cores with a CPU hog was seen to need more than 30.
 */
export const STARTUP_MS = 120_000;
