// The Node worker against a real `conveyor serve` (see harness.js for how it is started).
//
//   CONVEYOR_BIN=$PWD/target/debug/conveyor node --test clients/node/test/

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { ApiError, PermanentFailure, RetryAfter, Snooze, Worker } from '../src/index.js';
import { Server, skipReason, waitUntil } from './harness.js';

const HERE = dirname(fileURLToPath(import.meta.url));
// The tests check outcomes through the API; the workers' log shows with CONVEYOR_TEST_LOG=1.
const quiet = process.env.CONVEYOR_TEST_LOG === '1' ? console : { info() {}, warn() {}, error() {} };
const skip = skipReason();
if (skip) console.log(`skipped: ${skip}`);

describe('worker against conveyor serve', { skip }, () => {
  /** @type {Server} */
  let server;
  before(async () => {
    server = await Server.start();
  });
  after(async () => {
    await server?.close();
  });

  // Each test has its own queue, so no test's worker claims another's jobs, and stops its
  // workers and processes when it ends.
  function setup(t) {
    const queue = `node-${t.name.replace(/[^A-Za-z0-9]+/g, '-')}`.slice(0, 100);
    const workers = [];
    const procs = [];
    const runs = [];
    t.after(async () => {
      for (const w of workers) w.stop({ hurry: true });
      await Promise.allSettled(runs);
      for (const p of procs) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
    });
    return {
      queue,
      worker(opts = {}) {
        const w = new Worker({ url: server.url, key: server.workerKey, queues: [queue], waitSeconds: 1, logger: quiet, ...opts });
        workers.push(w);
        return w;
      },
      start(w) {
        const p = w.run({ signals: false });
        runs.push(p);
        return p;
      },
      async enqueue(kind, args, opts = {}) {
        return (await server.admin.enqueue(kind, args, { queue, ...opts })).job.id;
      },
      spawn(lease, grace) {
        const p = spawn(
          process.execPath,
          [join(HERE, 'worker_main.js'), server.url, server.workerKey, queue, String(lease), String(grace), server.dir],
          { stdio: ['ignore', 'ignore', 'pipe'] },
        );
        p.stderrText = '';
        p.stderr.on('data', (d) => (p.stderrText += d));
        p.exited = new Promise((r) => p.once('exit', (code, sig) => r({ code, sig })));
        procs.push(p);
        return p;
      },
    };
  }

  const marker = (what, id, pid) => join(server.dir, `${what}-${id}-${pid}`);

  test('runs jobs concurrently up to the limit', async (t) => {
    const s = setup(t);
    const w = s.worker({ concurrency: 3 });
    let running = 0;
    let max = 0;
    w.handle('test.sleep', async (args) => {
      running++;
      max = Math.max(max, running);
      await sleep(args.seconds * 1000);
      running--;
    });
    const ids = [];
    for (let i = 0; i < 7; i++) ids.push(await s.enqueue('test.sleep', { seconds: 0.6 }));
    const started = Date.now();
    s.start(w);
    for (const id of ids) await server.waitJob(id, (j) => j.state === 'completed');
    assert.equal(max, 3, 'three jobs at once, never more');
    // 7 jobs of 0.6 s, 3 at a time: 3 rounds (1.8 s), far below 7 × 0.6 s one by one.
    assert.ok(Date.now() - started < 3500, `took ${Date.now() - started} ms`);
  });

  test('the return value is the result, progress shows, and wait resolves to the outcome', async (t) => {
    const s = setup(t);
    const w = s.worker();
    let reported;
    const reportedP = new Promise((r) => (reported = r));
    let goOn;
    const goOnP = new Promise((r) => (goOn = r));
    w.handle('test.report', async (args, job) => {
      assert.equal(await job.progress(40, 'reading rows'), true);
      reported();
      await goOnP;
      return { rows: args.rows, ok: true };
    });
    w.handle('test.unencodable', () => ({ n: 1n })); // a BigInt is not JSON: the attempt fails
    const handle = await server.admin.enqueue('test.report', { rows: 12 }, { queue: s.queue });
    s.start(w);
    await reportedP;
    const running = await server.job(handle.id);
    assert.equal(running.progress.percent, 40);
    assert.equal(running.progress.message, 'reading rows');
    // The wait runs out while the job is still running: the job as it is.
    const early = await handle.wait(300);
    assert.equal(early.state, 'running');
    goOn();
    const started = Date.now();
    const done = await handle.wait(30_000);
    assert.equal(done.state, 'completed');
    assert.deepEqual(done.result, { rows: 12, ok: true });
    assert.ok(Date.now() - started < 5000, 'the wait resolves when the job ends');
    assert.deepEqual((await server.admin.wait(handle.id, 30_000)).result, { rows: 12, ok: true });

    const bad = await server.admin.enqueue('test.unencodable', {}, { queue: s.queue, maxAttempts: 1 });
    const dead = await bad.wait(30_000);
    assert.equal(dead.state, 'dead');
    assert.match(dead.attempts[0].error, /BigInt/);
    await assert.rejects(server.admin.wait('0193f5a2-0000-7000-8000-000000000000', 1000), (e) => e instanceof ApiError && e.status === 404);
  });

  test('a handler error retries with its message, cause and stack', async (t) => {
    const s = setup(t);
    const w = s.worker();
    function charge(amount) {
      throw new TypeError(`card declined for ${amount}`);
    }
    w.handle('test.flaky', async (args, job) => {
      if (job.attempt === 1) {
        try {
          charge(args.amount);
        } catch (e) {
          throw new Error('payment step failed', { cause: e });
        }
      }
    });
    const id = await s.enqueue('test.flaky', { amount: 42 }, { maxAttempts: 3 });
    s.start(w);
    const job = await server.waitJob(id, (j) => j.state === 'completed');
    assert.equal(job.attempt, 2);
    const [first, second] = job.attempts;
    assert.equal(first.outcome, 'failed');
    assert.equal(first.error, 'Error: payment step failed');
    assert.deepEqual(first.causes, ['TypeError: card declined for 42']);
    assert.match(first.traceback ?? '', /^Error: payment step failed\n\s+at /);
    assert.match(first.traceback, /Caused by: TypeError: card declined for 42\n\s+at charge /, 'the frame that threw');
    assert.equal(first.worker, w.workerId);
    assert.equal(second.outcome, 'completed');
  });

  test('a permanent failure makes the job dead at once', async (t) => {
    const s = setup(t);
    const w = s.worker();
    w.handle('test.bad', () => {
      throw new PermanentFailure('no such account');
    });
    const id = await s.enqueue('test.bad', {}, { maxAttempts: 5 });
    s.start(w);
    const job = await server.waitJob(id, (j) => j.state === 'dead');
    assert.equal(job.attempt, 1, 'no retry after a permanent failure');
    assert.equal(job.attempts[0].error, 'PermanentFailure: no such account');
  });

  test('retry-after and snooze', async (t) => {
    const s = setup(t);
    const w = s.worker();
    const seen = [];
    w.handle('test.later', (args, job) => {
      seen.push(job.attempt);
      if (seen.length === 1) return new Snooze(1); // a return value works as well as a throw
      if (seen.length === 2) throw new RetryAfter(1, 'rate limited upstream');
      return undefined;
    });
    const id = await s.enqueue('test.later', {});
    s.start(w);
    const job = await server.waitJob(id, (j) => j.state === 'completed', 20_000);
    assert.deepEqual(job.attempts.map((a) => a.outcome), ['snoozed', 'failed', 'completed']);
    assert.equal(job.attempts[1].error, 'RetryAfter: rate limited upstream');
    // A snooze does not use an attempt: the run after it is attempt 1 again.
    assert.deepEqual(seen, [1, 1, 2]);
  });

  test('heartbeats keep a job longer than its lease', async (t) => {
    const s = setup(t);
    const w = s.worker({ leaseSeconds: 2, heartbeatSeconds: 0.5 });
    w.handle('test.sleep', (args) => sleep(args.seconds * 1000));
    const id = await s.enqueue('test.sleep', { seconds: 5 });
    s.start(w);
    const job = await server.waitJob(id, (j) => j.state === 'completed', 20_000);
    assert.deepEqual(job.attempts.map((a) => a.outcome), ['completed'], 'never rescued');
  });

  test('an outcome after the lease was lost changes nothing', async (t) => {
    // Worker A's heartbeats fail (as in a network partition: the calls reject before they
    // reach the server), so its lease runs out while its handler still runs; worker B gets
    // the job and completes it. A's late outcome is refused (409 for its item) and dropped,
    // and A goes on working.
    const s = setup(t);
    // Concurrency 1: busy with its handler, A cannot claim the rescued job again itself.
    const a = s.worker({ concurrency: 1, leaseSeconds: 1, heartbeatSeconds: 0.3, workerId: `a-${s.queue}` });
    a.client.heartbeat = async () => {
      throw new Error('network unreachable (test)');
    };
    const runs = [];
    a.handle('test.slow', async (args, job) => {
      runs.push(`a:${job.id}`);
      await sleep(args.seconds * 1000);
    });
    const id = await s.enqueue('test.slow', { seconds: 4 });
    s.start(a);
    await waitUntil(() => runs.length === 1, 20_000, 'A starts the job');
    const b = s.worker({ workerId: `b-${s.queue}` });
    b.handle('test.slow', (args, job) => {
      runs.push(`b:${job.id}`);
    });
    const bRun = s.start(b);
    await server.waitJob(id, (j) => j.state === 'completed', 20_000);
    b.stop();
    await bRun;
    await sleep(4000); // A's handler ends and its outcome is refused
    const job = await server.job(id);
    assert.deepEqual(
      job.attempts.map((x) => [x.outcome, x.worker]),
      [
        ['lease_expired', a.workerId],
        ['completed', b.workerId],
      ],
    );
    assert.deepEqual(runs, [`a:${id}`, `b:${id}`]);
    // A is not wedged: it runs the next job.
    const next = await s.enqueue('test.slow', { seconds: 0 });
    await server.waitJob(next, (j) => j.state === 'completed', 20_000);
    assert.equal(runs.at(-1), `a:${next}`);
  });

  test('a worker killed mid-job loses it to another worker', async (t) => {
    const s = setup(t);
    const id = await s.enqueue('test.sleep', { seconds: 2 });
    const first = s.spawn(2, 5);
    await waitUntil(() => existsSync(marker('started', id, first.pid)), 20_000, 'the first worker starts the job');
    first.kill('SIGKILL');
    await first.exited;
    const second = s.spawn(2, 5);
    const job = await server.waitJob(id, (j) => j.state === 'completed', 30_000);
    assert.ok(!existsSync(marker('done', id, first.pid)));
    assert.ok(existsSync(marker('done', id, second.pid)));
    assert.deepEqual(
      job.attempts.map((a) => [a.outcome, a.worker]),
      [
        ['lease_expired', `node-${first.pid}`],
        ['completed', `node-${second.pid}`],
      ],
    );
  });

  test('SIGTERM lets the running job finish and exits 0', async (t) => {
    const s = setup(t);
    const id = await s.enqueue('test.sleep', { seconds: 1.5 });
    const proc = s.spawn(10, 20);
    await waitUntil(() => existsSync(marker('started', id, proc.pid)), 20_000, 'the worker starts the job');
    proc.kill('SIGTERM');
    await waitUntil(() => proc.stderrText.includes('SIGTERM: claiming no more jobs'), 10_000, 'the worker takes the signal');
    // Enqueued once the worker has taken SIGTERM: it must not run it.
    const later = await s.enqueue('test.sleep', { seconds: 0 });
    const { code } = await proc.exited;
    assert.equal(code, 0, proc.stderrText);
    assert.ok(existsSync(marker('done', id, proc.pid)));
    assert.equal((await server.job(id)).state, 'completed');
    const afterJob = await server.job(later);
    assert.ok(['available', 'scheduled'].includes(afterJob.state), JSON.stringify(afterJob));
    assert.ok(!afterJob.attempts.some((a) => a.outcome === 'completed'));
  });

  test('SIGTERM hands back a job that outlives the grace period', async (t) => {
    const s = setup(t);
    const id = await s.enqueue('test.sleep', { seconds: 30 });
    const proc = s.spawn(10, 0.5);
    await waitUntil(() => existsSync(marker('started', id, proc.pid)), 20_000, 'the worker starts the job');
    const stopped = Date.now();
    proc.kill('SIGTERM');
    const { code } = await proc.exited;
    assert.equal(code, 0, proc.stderrText);
    // The grace (0.5 s) and a last long poll (1 s), not the handler's 30 s.
    assert.ok(Date.now() - stopped < 10_000, `exited after ${Date.now() - stopped} ms`);
    const job = await server.job(id);
    assert.ok(['available', 'scheduled'].includes(job.state), JSON.stringify(job));
    assert.deepEqual(job.attempts.map((a) => a.outcome), ['snoozed'], 'handed back, no attempt used');
    assert.equal(job.attempt, 0);
  });

  test('outcomes are sent in batches', async (t) => {
    const s = setup(t);
    const w = s.worker({ concurrency: 40, finishIntervalMs: 200 });
    const sizes = [];
    const send = w.client.finish.bind(w.client);
    w.client.finish = (workerId, items) => {
      sizes.push(items.length);
      return send(workerId, items);
    };
    w.handle('test.quick', () => {});
    const ids = [];
    for (let n = 0; n < 40; n++) ids.push(await s.enqueue('test.quick', { n }));
    s.start(w);
    for (const id of ids) await server.waitJob(id, (j) => j.state === 'completed');
    assert.equal(sizes.reduce((a, b) => a + b, 0), 40, 'one outcome per job');
    assert.ok(sizes.length < 40, `batched, not one call per job: ${sizes}`);
  });

  test('a cancel request reaches the running handler', async (t) => {
    const s = setup(t);
    const w = s.worker({ leaseSeconds: 2, heartbeatSeconds: 0.3 });
    let started = false;
    let seen = false;
    w.handle('test.long', async (args, job) => {
      if (job.attempt > 1) return;
      started = true;
      await new Promise((resolve) => job.signal.addEventListener('abort', resolve, { once: true }));
      seen = job.cancelRequested;
      throw new Error('stopped: cancel requested');
    });
    const id = await s.enqueue('test.long', {});
    s.start(w);
    await waitUntil(() => started, 20_000, 'the handler starts');
    const answer = await server.admin.request('POST', `/v1/jobs/${id}/cancel`, {});
    assert.equal(answer.result, 'requested');
    // The next heartbeat (every 0.3 s) carries the request to the handler.
    await waitUntil(() => seen, 5000, 'job.signal aborted with cancelRequested');
    const job = await server.waitJob(id, (j) => j.attempts.length >= 1, 10_000);
    assert.equal(job.attempts[0].error, 'Error: stopped: cancel requested');
  });

  test('a key restricted to other queues is refused', async (t) => {
    const s = setup(t);
    const key = JSON.parse(
      server.cli('keys', 'create', '--scope', 'worker', '--name', `other-${s.queue}`, '--queue', 'elsewhere', '--json'),
    ).key;
    const w = new Worker({ url: server.url, key, queues: [s.queue], waitSeconds: 0, logger: quiet });
    w.handle('test.sleep', () => {});
    await assert.rejects(w.run({ signals: false }), (e) => e instanceof ApiError && e.status === 403);
  });

  test('a key without the worker scope is refused', async (t) => {
    const s = setup(t);
    const readKey = server.createKey('read', `read-${s.queue}`);
    const w = new Worker({ url: server.url, key: readKey, queues: [s.queue], waitSeconds: 0, logger: quiet });
    w.handle('test.sleep', () => {});
    await assert.rejects(w.run({ signals: false }), (e) => e instanceof ApiError && e.status === 403);
  });

  test('bad settings are refused with the setting named', () => {
    const base = { url: server.url, key: server.workerKey };
    for (const [opts, word] of [
      [{ concurrency: 0 }, 'concurrency'],
      [{ leaseSeconds: 0 }, 'leaseSeconds'],
      [{ waitSeconds: 31 }, 'waitSeconds'],
      [{ leaseSeconds: 10, heartbeatSeconds: 6 }, 'heartbeatSeconds'],
      [{ queues: [] }, 'queues'],
      [{ url: 'ftp://example.com' }, 'url'],
    ]) {
      assert.throws(() => new Worker({ ...base, ...opts }), (e) => e.message.startsWith(word), word);
    }
    const w = new Worker(base);
    w.handle('a.kind', () => {});
    assert.throws(() => w.handle('a.kind', () => {}), /already has a handler/);
  });
});
