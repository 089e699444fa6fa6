// What a handler can throw (or return) to say how its job ends, other than success or a plain
// error (a retryable failure with the error's message and stack).

// Longest message (characters) and traceback (UTF-8 bytes) sent for one failure, within the
// server's limits; longer ones are cut (the stack keeps its start, where the throwing frame is).
const MAX_MESSAGE = 10_000;
const MAX_TRACEBACK = 60 * 1024;
const MAX_CAUSES = 32;

function checkSeconds(seconds, what) {
  if (typeof seconds !== 'number' || !Number.isFinite(seconds) || seconds < 0) {
    throw new RangeError(`${what}: ${seconds} is not a number of seconds >= 0`);
  }
  return seconds;
}

/** Run the job again after `seconds` without using an attempt. */
export class Snooze extends Error {
  constructor(seconds) {
    const s = checkSeconds(seconds, 'Snooze seconds');
    super(`snooze for ${s}s`);
    this.name = 'Snooze';
    this.seconds = s;
  }
}

/** A retryable failure that runs again after `seconds` instead of the server's backoff. */
export class RetryAfter extends Error {
  constructor(seconds, message = 'retry requested', options) {
    super(message, options);
    this.name = 'RetryAfter';
    this.seconds = checkSeconds(seconds, 'RetryAfter seconds');
  }
}

/** A failure no retry can fix: the job goes `dead` at once, whatever attempts remain. */
export class PermanentFailure extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = 'PermanentFailure';
  }
}

function line(err) {
  if (err instanceof Error) return err.message ? `${err.name}: ${err.message}` : err.name;
  try {
    return typeof err === 'string' ? err : `thrown value: ${JSON.stringify(err) ?? String(err)}`;
  } catch {
    return `thrown value: ${String(err)}`;
  }
}

/**
 * The `error` object of a `fail` outcome: the message (`Name: text`), the `cause` chain and
 * the stack as the traceback.
 * @param {unknown} err
 * @returns {{message: string, causes?: string[], traceback?: string}}
 */
export function describeError(err) {
  const error = { message: line(err).slice(0, MAX_MESSAGE) };
  const causes = [];
  const seen = new Set([err]);
  let cur = err;
  while (cur instanceof Error && cur.cause !== undefined && !seen.has(cur.cause) && causes.length < MAX_CAUSES) {
    seen.add(cur.cause);
    causes.push(line(cur.cause).slice(0, MAX_MESSAGE));
    cur = cur.cause;
  }
  if (causes.length > 0) error.causes = causes;
  if (err instanceof Error && typeof err.stack === 'string') {
    let tb = err.stack;
    for (let c = err.cause, n = 0; c instanceof Error && n < MAX_CAUSES && typeof c.stack === 'string'; c = c.cause, n++) {
      tb += `\nCaused by: ${c.stack}`;
    }
    const bytes = Buffer.from(tb, 'utf8');
    error.traceback = bytes.length > MAX_TRACEBACK ? `${bytes.subarray(0, MAX_TRACEBACK).toString('utf8')}\n…` : tb;
  }
  return error;
}
