// A small client for Conveyor's HTTP API: the remote-worker routes and enqueue. No
// dependencies: Node's global fetch (keep-alive connections are pooled by it).

/** The API refused a request. `status` is the HTTP status, `problem` the problem document. */
export class ApiError extends Error {
  /**
   * @param {number} status
   * @param {Record<string, any>} problem
   * @param {string} method
   * @param {string} path
   * @param {number | undefined} retryAfter seconds, from a `Retry-After` header
   */
  constructor(status, problem, method, path, retryAfter) {
    super(`${method} ${path}: ${status} ${problem.detail ?? problem.title ?? 'no detail'}`);
    this.name = 'ApiError';
    this.status = status;
    this.problem = problem;
    this.code = problem.code;
    this.retryAfter = retryAfter;
  }
}

/** 409 from a worker route: the job's lease is no longer this worker's (rescued, perhaps
 * leased again). Drop the job; do not retry the call. */
export class LeaseLost extends ApiError {
  constructor(...args) {
    super(...args);
    this.name = 'LeaseLost';
  }
}

/** The states a job ends in: what {@link Client#wait} waits for. */
export const TERMINAL_STATES = Object.freeze(['completed', 'cancelled', 'dead']);

/** The longest wait one `GET /v1/jobs/{id}?wait=` may ask for (the server refuses longer). */
const MAX_WAIT_STEP_MS = 60_000;

export class Client {
  /**
   * @param {string} baseUrl the API's address, e.g. `http://127.0.0.1:8080`
   * @param {string} key an API key (`cvk_…`): scope `worker` for the worker routes, `enqueue`
   *   for {@link Client#enqueue}, `read` for {@link Client#getJob}
   * @param {{timeoutMs?: number}} [options]
   */
  constructor(baseUrl, key, { timeoutMs = 60_000 } = {}) {
    let url;
    try {
      url = new URL(baseUrl);
    } catch {
      url = undefined;
    }
    if (!url || !['http:', 'https:'].includes(url.protocol)) {
      throw new TypeError(`url: \`${baseUrl}\` is not an http(s) URL; use e.g. http://127.0.0.1:8080`);
    }
    if (!key) {
      throw new TypeError('key: empty; create one with `conveyor keys create --scope worker --name NAME`');
    }
    this.base = baseUrl.replace(/\/+$/, '');
    this.key = key;
    this.timeoutMs = timeoutMs;
  }

  /**
   * Sends one request; resolves to the decoded JSON answer (`null` when empty). Rejects with
   * {@link LeaseLost} on 409 from a worker route, {@link ApiError} on any other refusal, and
   * the fetch error when the server cannot be reached.
   * @param {string} method
   * @param {string} path
   * @param {any} [body]
   * @param {{timeoutMs?: number, signal?: AbortSignal}} [options]
   */
  async request(method, path, body, { timeoutMs, signal } = {}) {
    const headers = { authorization: `Bearer ${this.key}`, accept: 'application/json' };
    if (body !== undefined) headers['content-type'] = 'application/json';
    const timeout = AbortSignal.timeout(timeoutMs ?? this.timeoutMs);
    const res = await fetch(this.base + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: signal ? AbortSignal.any([signal, timeout]) : timeout,
    });
    const text = await res.text();
    if (res.ok) return text.trim() ? JSON.parse(text) : null;
    let problem;
    try {
      problem = text.trim() ? JSON.parse(text) : {};
      if (problem === null || typeof problem !== 'object') problem = { detail: String(problem) };
    } catch {
      problem = { detail: text.slice(0, 500) };
    }
    const ra = Number.parseFloat(res.headers.get('retry-after') ?? '');
    const Cls = res.status === 409 && path.startsWith('/v1/workers/') ? LeaseLost : ApiError;
    throw new Cls(res.status, problem, method, path, Number.isFinite(ra) ? ra : undefined);
  }

  /**
   * `POST /v1/jobs`: enqueues one job. Resolves to `{duplicate, job, warnings}` with `id`
   * (the job's) and `wait(timeoutMs)`, which resolves to the job once it has finished
   * ({@link Client#wait}; needs the `read` scope too, which an `admin` key has):
   * `const job = await (await client.enqueue('report.build', args)).wait(30_000)`.
   * @param {string} kind
   * @param {any} [args]
   * @param {{queue?: string, priority?: number, maxAttempts?: number, runAt?: string|Date,
   *   delaySeconds?: number, idempotencyKey?: string, tags?: string[], metadata?: object}} [options]
   */
  enqueue(kind, args, options = {}) {
    const body = { kind };
    const fields = {
      args,
      queue: options.queue,
      priority: options.priority,
      max_attempts: options.maxAttempts,
      run_at: options.runAt instanceof Date ? options.runAt.toISOString() : options.runAt,
      delay_seconds: options.delaySeconds,
      idempotency_key: options.idempotencyKey,
      tags: options.tags,
      metadata: options.metadata,
    };
    for (const [k, v] of Object.entries(fields)) if (v !== undefined) body[k] = v;
    return this.request('POST', '/v1/jobs', body).then((answer) =>
      Object.assign(answer, {
        id: String(answer.job.id),
        wait: (timeoutMs) => this.wait(String(answer.job.id), timeoutMs),
      }),
    );
  }

  /**
   * Resolves to the job once it has finished (`completed`, `cancelled` or `dead`; `result`
   * is what its handler returned), or as it is when `timeoutMs` has passed (check `state`).
   * Long-polls `GET /v1/jobs/{id}?wait=` (at most 60 s a request, asking again while the job
   * runs), so it resolves as soon as the job finishes, without polling. Needs a `read` key;
   * rejects with {@link ApiError} (404) if the job does not exist.
   * @param {string} id
   * @param {number} [timeoutMs] default 60 000
   */
  async wait(id, timeoutMs = 60_000) {
    if (typeof timeoutMs !== 'number' || !(timeoutMs >= 0)) {
      throw new RangeError(`timeoutMs: ${timeoutMs} is not a number of milliseconds >= 0`);
    }
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const step = Math.floor(Math.max(0, Math.min(deadline - Date.now(), MAX_WAIT_STEP_MS)));
      const job = await this.request('GET', `/v1/jobs/${encodeURIComponent(id)}?wait=${step}ms`, undefined, {
        // The server answers by the end of the wait; allow for the trip.
        timeoutMs: step + this.timeoutMs,
      });
      if (TERMINAL_STATES.includes(job.state) || Date.now() >= deadline) return job;
    }
  }

  /** `GET /v1/jobs/{id}`: the job with its attempt history (needs a `read` key). */
  getJob(id) {
    return this.request('GET', `/v1/jobs/${encodeURIComponent(id)}`);
  }

  /** `POST /v1/workers/claim`: up to `limit` jobs, waiting up to `waitSeconds` for one. */
  async claim(workerId, queues, limit, leaseSeconds, waitSeconds, signal) {
    const answer = await this.request(
      'POST',
      '/v1/workers/claim',
      { worker_id: workerId, queues, limit, lease_seconds: leaseSeconds, wait_seconds: waitSeconds },
      { timeoutMs: waitSeconds * 1000 + this.timeoutMs, signal },
    );
    return answer?.jobs ?? [];
  }

  /** `POST /v1/workers/heartbeat`: renews leases; resolves to `{renewed, lost}`. */
  heartbeat(workerId, jobIds, leaseSeconds) {
    return this.request('POST', '/v1/workers/heartbeat', {
      worker_id: workerId,
      job_ids: jobIds,
      lease_seconds: leaseSeconds,
    });
  }

  /** `POST /v1/workers/jobs/{id}/progress`: a running attempt's progress. Rejects with
   * {@link LeaseLost} when the attempt is not this worker's lease. */
  async reportProgress(workerId, id, attempt, percent, message) {
    const body = { worker_id: workerId, attempt, percent };
    if (message !== undefined && message !== null) body.message = String(message);
    await this.request('POST', `/v1/workers/jobs/${encodeURIComponent(id)}/progress`, body);
  }

  /** `POST /v1/workers/finish`: many outcomes in one call; resolves to one item per outcome. */
  async finish(workerId, items) {
    const answer = await this.request('POST', '/v1/workers/finish', { worker_id: workerId, items });
    return answer?.items ?? [];
  }
}
