// The worker: claims jobs over HTTP, runs the registered handlers (up to `concurrency` at
// once), renews the leases it holds, and sends outcomes in batches.

import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';

import { ApiError, Client } from './client.js';
import { PermanentFailure, RetryAfter, Snooze, describeError } from './outcome.js';

/** How long a job whose kind has no handler here waits before it is claimed again (a snooze:
 * the attempt does not count), so a worker with the kind can pick it up. */
export const NO_HANDLER_SNOOZE = 60;

/**
 * @typedef {object} Job one claimed job, as the handler sees it
 * @property {string} id
 * @property {string} queue
 * @property {string} kind
 * @property {any} args
 * @property {number} attempt 1-based
 * @property {number} maxAttempts
 * @property {number} priority
 * @property {string[]} tags
 * @property {Record<string, any>} metadata
 * @property {string} [createdAt]
 * @property {string} [leaseExpiresAt]
 * @property {AbortSignal} signal aborted when the lease is lost (the job was rescued), when
 *   someone asks to cancel the job (`cancelRequested` is then true: stop early and throw),
 *   or when the worker stops without waiting; a long handler may watch it and stop early
 * @property {boolean} cancelRequested
 */

/**
 * @typedef {(args: any, job: Job) => any} Handler
 */

function range(name, value, lo, hi) {
  if (!Number.isInteger(value) || value < lo || value > hi) {
    throw new RangeError(`${name}: ${value} is out of range; use an integer from ${lo} to ${hi}`);
  }
}

export class Worker {
  /**
   * @param {object} options
   * @param {string} options.url the API's address
   * @param {string} options.key a key with scope `worker`
   * @param {string[]} [options.queues] default `['default']`
   * @param {number} [options.concurrency] jobs at once (10)
   * @param {number} [options.leaseSeconds] 1-3600 (30)
   * @param {number} [options.heartbeatSeconds] at most half the lease (a third by default)
   * @param {number} [options.waitSeconds] long-poll of one claim, 0-30 (10)
   * @param {number} [options.shutdownGrace] seconds running jobs get after SIGTERM (30)
   * @param {number} [options.finishBatch] most outcomes per call, 1-1000 (100)
   * @param {number} [options.finishIntervalMs] how long an outcome waits for others (20)
   * @param {string} [options.workerId] default `<host>-<pid>-<random>`
   * @param {{info: Function, warn: Function, error: Function}} [options.logger] default console
   */
  constructor({
    url,
    key,
    queues = ['default'],
    concurrency = 10,
    leaseSeconds = 30,
    heartbeatSeconds,
    waitSeconds = 10,
    shutdownGrace = 30,
    finishBatch = 100,
    finishIntervalMs = 20,
    workerId,
    logger = console,
  }) {
    if (!Array.isArray(queues) || queues.length === 0) {
      throw new TypeError("queues: empty; name at least one queue, e.g. queues: ['default']");
    }
    range('concurrency', concurrency, 1, 1000);
    range('leaseSeconds', leaseSeconds, 1, 3600);
    range('waitSeconds', waitSeconds, 0, 30);
    range('finishBatch', finishBatch, 1, 1000);
    heartbeatSeconds ??= leaseSeconds / 3;
    if (!(heartbeatSeconds > 0 && heartbeatSeconds <= leaseSeconds / 2)) {
      throw new RangeError(
        `heartbeatSeconds: ${heartbeatSeconds} must be above 0 and at most half of leaseSeconds (${leaseSeconds})`,
      );
    }
    this.client = new Client(url, key);
    this.queues = [...queues];
    this.concurrency = concurrency;
    this.leaseSeconds = leaseSeconds;
    this.heartbeatSeconds = heartbeatSeconds;
    this.waitSeconds = waitSeconds;
    this.shutdownGrace = shutdownGrace;
    this.finishBatch = finishBatch;
    this.finishIntervalMs = finishIntervalMs;
    this.workerId = workerId ?? `${hostname()}-${process.pid}-${randomBytes(4).toString('hex')}`;
    this.log = logger;
    /** @type {Map<string, Handler>} */
    this.handlers = new Map();
    /** handler still running: id -> {job, controller} */
    this.running = new Map();
    /** leased (running, or outcome not yet recorded): id -> {job, controller} */
    this.held = new Map();
    this.outcomes = [];
    this.stopping = false;
    this.hurry = false;
    this.closed = false;
    this.fatal = undefined;
    this.claimAbort = new AbortController();
    this.waiters = new Set();
  }

  /**
   * Registers `fn(args, job)` (sync or async) as the handler of `kind`.
   * @param {string} kind
   * @param {Handler} fn
   */
  handle(kind, fn) {
    if (!kind) throw new TypeError("kind: empty; name the job kind, e.g. 'email.send'");
    if (typeof fn !== 'function') throw new TypeError(`handler of \`${kind}\`: not a function`);
    if (this.handlers.has(kind)) throw new Error(`kind: \`${kind}\` already has a handler`);
    this.handlers.set(kind, fn);
    return this;
  }

  /** Stops claiming; running jobs get the grace period (none with `hurry`). */
  stop({ hurry = false } = {}) {
    this.stopping = true;
    if (hurry) {
      this.hurry = true;
      this.claimAbort.abort();
      for (const { controller } of this.running.values()) controller.abort(new Error('worker stopping'));
    }
    this.#wake();
  }

  #wake() {
    for (const w of this.waiters) w();
    this.waiters.clear();
  }

  /** Resolves on the next state change (a job ends, a stop) or after `ms`. */
  #changed(ms) {
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      const self = this;
      function done() {
        clearTimeout(t);
        self.waiters.delete(done);
        resolve();
      }
      this.waiters.add(done);
    });
  }

  /**
   * Runs until {@link Worker#stop}, SIGTERM or SIGINT (a second signal skips the grace
   * period), then shuts down gracefully and resolves. Rejects with {@link ApiError} if the
   * server refuses the worker for good (a bad key, a queue outside the key's scope).
   * @param {{signals?: boolean}} [options] `signals: false` leaves SIGTERM/SIGINT alone
   */
  async run({ signals = true } = {}) {
    if (this.handlers.size === 0) throw new Error("no handlers registered; add one with worker.handle('kind', fn)");
    const onSignal = (sig) => {
      if (this.stopping) {
        this.log.warn(`${sig} again: not waiting for running jobs`);
        this.stop({ hurry: true });
      } else {
        this.log.info(`${sig}: claiming no more jobs; running jobs have ${this.shutdownGrace}s to finish`);
        this.stop();
      }
    };
    if (signals) {
      process.on('SIGTERM', onSignal);
      process.on('SIGINT', onSignal);
    }
    this.log.info(
      `worker ${this.workerId} started on queues ${this.queues.join(',')} (concurrency ${this.concurrency})`,
    );
    const claiming = this.#claimLoop();
    const heartbeats = this.#heartbeatLoop();
    const finishing = this.#finishLoop();
    try {
      while (!this.stopping) await this.#changed(1000);
      await this.#drain(claiming);
    } finally {
      this.closed = true;
      this.#wake();
      await Promise.allSettled([heartbeats, finishing]);
      if (signals) {
        process.off('SIGTERM', onSignal);
        process.off('SIGINT', onSignal);
      }
    }
    this.log.info(`worker ${this.workerId} stopped`);
    if (this.fatal) throw this.fatal;
  }

  async #drain(claiming) {
    const deadline = Date.now() + this.shutdownGrace * 1000;
    while (this.running.size > 0 && !this.hurry && Date.now() < deadline) {
      await this.#changed(Math.min(200, deadline - Date.now()));
    }
    // A long poll under way at the stop hands back what it claims; wait for it.
    if (!this.hurry) await claiming;
    for (const [id, entry] of this.running) {
      this.log.warn(`job ${id} (${entry.job.kind}) still running at shutdown: handing it back`);
      entry.controller.abort(new Error('worker stopping'));
      this.outcomes.push({ id, attempt: entry.job.attempt, outcome: 'snooze', seconds: 0 });
    }
    this.running.clear();
    this.#wake();
    // Wait for the outcomes to be recorded (the heartbeat keeps their leases meanwhile).
    const flushDeadline = Date.now() + Math.max(5, this.heartbeatSeconds) * 1000;
    while (this.held.size > 0 && Date.now() < flushDeadline) await this.#changed(50);
    if (this.held.size > 0) {
      this.log.warn(`${this.held.size} outcomes not recorded at exit; their leases will expire`);
    }
  }

  // -- claiming and running ---------------------------------------------------------------

  async #claimLoop() {
    let backoff = 0;
    while (!this.stopping) {
      while (this.running.size >= this.concurrency && !this.stopping) await this.#changed(500);
      if (this.stopping) return;
      let raw;
      try {
        raw = await this.client.claim(
          this.workerId,
          this.queues,
          this.concurrency - this.running.size,
          this.leaseSeconds,
          this.waitSeconds,
          this.claimAbort.signal,
        );
        backoff = 0;
      } catch (e) {
        if (this.hurry) return;
        if (e instanceof ApiError && [400, 401, 403, 404, 422].includes(e.status)) {
          this.log.error(`claim refused, stopping: ${e.message}`);
          this.fatal = e;
          this.stop({ hurry: true });
          return;
        }
        backoff = e instanceof ApiError && e.retryAfter !== undefined ? e.retryAfter : Math.min(Math.max(backoff * 2, 0.5), 10);
        this.log.warn(`claim failed (${e.message}); again in ${backoff}s`);
        await Promise.race([sleep(backoff * 1000), this.#changed(backoff * 1000)]);
        continue;
      }
      for (const r of raw) {
        const controller = new AbortController();
        const job = {
          id: String(r.id),
          queue: r.queue,
          kind: r.kind,
          args: r.args,
          attempt: r.attempt,
          maxAttempts: r.max_attempts,
          priority: r.priority ?? 0,
          tags: r.tags ?? [],
          metadata: r.metadata ?? {},
          createdAt: r.created_at,
          leaseExpiresAt: r.lease_expires_at,
          signal: controller.signal,
          cancelRequested: false,
          /**
           * Reports how far the attempt has got: `percent` (0-100) and an optional message
           * (at most 1024 bytes are kept), shown as the job's `progress` by
           * `GET /v1/jobs/{id}`. One request per call: report at most a few times a second.
           * Resolves to whether the server recorded it (false when the lease was lost or the
           * server could not be reached; the job carries on either way).
           * @param {number} percent
           * @param {string} [message]
           */
          progress: (percent, message) => this.#progress(job, percent, message),
        };
        const entry = { job, controller };
        this.held.set(job.id, entry);
        if (this.stopping) {
          // Claimed by a long poll under way when the stop came: handed back at once,
          // without running and without using an attempt.
          this.#push({ id: job.id, attempt: job.attempt, outcome: 'snooze', seconds: 0 });
          continue;
        }
        this.running.set(job.id, entry);
        void this.#execute(entry);
      }
    }
  }

  async #execute({ job, controller }) {
    const fn = this.handlers.get(job.kind);
    const item = { id: job.id, attempt: job.attempt };
    if (!fn) {
      this.log.warn(`no handler for kind \`${job.kind}\` (job ${job.id}): snoozed ${NO_HANDLER_SNOOZE}s`);
      Object.assign(item, { outcome: 'snooze', seconds: NO_HANDLER_SNOOZE });
    } else {
      try {
        const value = await fn(job.args, job);
        if (value instanceof Snooze || value instanceof RetryAfter || value instanceof PermanentFailure) throw value;
        item.outcome = 'complete';
        // The result travels as JSON: a value that is not (a BigInt, a cycle) is the
        // handler's error; `undefined` (and what serializes to nothing) is no result.
        if (value !== undefined && JSON.stringify(value) !== undefined) item.result = value;
      } catch (e) {
        if (this.hurry && controller.signal.aborted) {
          // Stopped without waiting: handed back, the attempt does not count.
          Object.assign(item, { outcome: 'snooze', seconds: 0 });
        } else if (e instanceof Snooze) {
          Object.assign(item, { outcome: 'snooze', seconds: e.seconds });
        } else if (e instanceof RetryAfter) {
          Object.assign(item, { outcome: 'fail', error: describeError(e), retryable: true, retry_after_seconds: e.seconds });
        } else if (e instanceof PermanentFailure) {
          Object.assign(item, { outcome: 'fail', error: describeError(e), retryable: false });
        } else {
          Object.assign(item, { outcome: 'fail', error: describeError(e), retryable: true });
        }
      }
    }
    const stillOurs = this.running.delete(job.id);
    this.#wake();
    if (!stillOurs) return; // handed back at shutdown after the grace period
    if (controller.signal.aborted && !this.held.has(job.id)) {
      this.log.warn(`job ${job.id} finished after its lease was lost; outcome dropped`);
      return;
    }
    this.#push(item);
  }

  async #progress(job, percent, message) {
    if (typeof percent !== 'number' || !(percent >= 0 && percent <= 100)) {
      throw new RangeError(`percent: ${percent} is not a number from 0 to 100`);
    }
    if (!this.held.has(job.id)) return false;
    try {
      await this.client.reportProgress(this.workerId, job.id, job.attempt, percent, message);
      return true;
    } catch (e) {
      this.log.warn(`job ${job.id}: progress not recorded: ${e.message}`);
      return false;
    }
  }

  #push(item) {
    this.outcomes.push(item);
    this.#wake();
  }

  // -- outcomes ---------------------------------------------------------------------------

  async #finishLoop() {
    while (!this.closed) {
      if (this.outcomes.length === 0) {
        await this.#changed(100);
        continue;
      }
      if (this.outcomes.length < this.finishBatch) await sleep(this.finishIntervalMs);
      const batch = this.outcomes.splice(0, this.finishBatch).filter((i) => this.held.has(i.id));
      if (batch.length > 0) await this.#send(batch);
    }
  }

  async #send(batch) {
    let delay = 0.2;
    let answers = [];
    for (;;) {
      try {
        answers = await this.client.finish(this.workerId, batch);
        break;
      } catch (e) {
        if (e instanceof ApiError && e.status !== 429 && e.status < 500) {
          this.log.error(`outcomes refused (${e.message}); dropped: ${batch.map((i) => i.id).join(', ')}`);
          break;
        }
        delay = e instanceof ApiError && e.retryAfter !== undefined ? e.retryAfter : Math.min(delay * 2, 5);
        this.log.warn(`sending outcomes failed (${e.message}); again in ${delay}s`);
      }
      if (this.closed) return;
      await sleep(delay * 1000);
    }
    for (const a of answers) {
      if (a.status === 409 || a.status === 'conflict') {
        this.log.warn(`job ${a.id}: lease lost before its outcome arrived; dropped`);
      } else if (typeof a.status === 'number' && (a.status < 200 || a.status >= 300)) {
        this.log.error(`job ${a.id}: outcome refused: ${JSON.stringify(a.error)}`);
      }
    }
    for (const i of batch) this.held.delete(i.id);
    this.#wake();
  }

  // -- leases -----------------------------------------------------------------------------

  async #heartbeatLoop() {
    while (!this.closed) {
      const next = Date.now() + this.heartbeatSeconds * 1000;
      while (!this.closed && Date.now() < next) await this.#changed(next - Date.now());
      if (this.closed) return;
      const ids = [...this.held.keys()];
      // The route takes at most 1000 ids a call.
      for (let i = 0; i < ids.length; i += 1000) await this.#heartbeat(ids.slice(i, i + 1000));
    }
  }

  async #heartbeat(ids) {
    let answer;
    try {
      answer = await this.client.heartbeat(this.workerId, ids, this.leaseSeconds);
    } catch (e) {
      this.log.warn(`heartbeat failed: ${e.message}`);
      return;
    }
    const lost = (answer?.lost ?? []).map(String);
    if (lost.length > 0) this.log.warn(`leases lost (jobs rescued): ${lost.join(', ')}`);
    for (const id of lost) {
      const entry = this.held.get(id);
      this.held.delete(id);
      entry?.controller.abort(new Error('lease lost: the job was rescued'));
    }
    for (const id of (answer?.cancel_requested ?? []).map(String)) {
      const entry = this.held.get(id);
      if (entry && !entry.controller.signal.aborted) {
        this.log.info(`job ${id}: cancel requested`);
        entry.job.cancelRequested = true;
        entry.controller.abort(new Error('cancel requested'));
      }
    }
    if (lost.length > 0) this.#wake();
  }
}
