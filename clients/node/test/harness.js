// Starts a real `conveyor serve` (SQLite in a temporary folder, a free port) for the tests.
// The binary is $CONVEYOR_BIN; without it the tests are skipped with the reason printed,
// unless CI=true, where a missing binary fails them.

import { spawn, execFileSync } from 'node:child_process';
import { accessSync, constants, mkdtempSync, openSync, readFileSync, rmSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { Client } from '../src/index.js';

// Short leases and a fast rescuer, so a killed worker's job is back within seconds.
const SERVER_ENV = {
  CONVEYOR_MAINTENANCE__RESCUER__INTERVAL: '200ms',
  CONVEYOR_MAINTENANCE__RESCUER__RETRY__BASE: '100ms',
  CONVEYOR_MAINTENANCE__RESCUER__RETRY__JITTER: '0',
  CONVEYOR_MAINTENANCE__PROMOTER__INTERVAL: '100ms',
  CONVEYOR_API__RATE_LIMIT__PER_SECOND: '100000',
  CONVEYOR_API__RATE_LIMIT__BURST: '100000',
};

/** The reason to skip (`undefined` when the binary is there); throws under CI=true. */
export function skipReason() {
  const bin = process.env.CONVEYOR_BIN;
  let reason;
  if (!bin) reason = 'CONVEYOR_BIN is not set; set it to a built `conveyor`';
  else {
    try {
      accessSync(bin, constants.X_OK);
    } catch {
      reason = `CONVEYOR_BIN is ${bin}, not an executable`;
    }
  }
  if (reason && process.env.CI === 'true') throw new Error(reason);
  return reason;
}

/** One `conveyor serve --roles api,scheduler` on a fresh SQLite store: the API and the
 * maintenance (promoter, rescuer); no native worker, so only the workers under test run jobs. */
export class Server {
  static async start() {
    const s = new Server();
    await s.#listening();
    return s;
  }

  constructor() {
    this.bin = process.env.CONVEYOR_BIN;
    this.dir = mkdtempSync(join(tmpdir(), 'conveyor-node-'));
    this.db = `sqlite://${this.dir}/conveyor.db`;
    this.env = Object.fromEntries(
      Object.entries(process.env).filter(([k]) => !k.startsWith('CONVEYOR_') && k !== 'RUST_LOG'),
    );
    Object.assign(this.env, SERVER_ENV);
    this.cli('migrate');
    this.workerKey = this.createKey('worker', 'node-worker');
    this.adminKey = this.createKey('admin', 'node-admin');
    this.logPath = join(this.dir, 'serve.log');
    const fd = openSync(this.logPath, 'w');
    this.proc = spawn(
      this.bin,
      ['serve', '--roles', 'api,scheduler', '--database-url', this.db, '--listen', '127.0.0.1:0'],
      { cwd: this.dir, env: this.env, stdio: ['ignore', fd, fd] },
    );
    closeSync(fd);
  }

  cli(...args) {
    return execFileSync(this.bin, [...args, '--database-url', this.db], {
      cwd: this.dir,
      env: this.env,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: 60_000,
    });
  }

  createKey(scope, name) {
    return JSON.parse(this.cli('keys', 'create', '--scope', scope, '--name', name, '--json')).key;
  }

  async #listening() {
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      const m = /listening on (http:\/\/[0-9.:]+)/.exec(readFileSync(this.logPath, 'utf8'));
      if (m) {
        this.url = m[1];
        this.admin = new Client(this.url, this.adminKey);
        return;
      }
      if (this.proc.exitCode !== null) break;
      await sleep(50);
    }
    throw new Error(`conveyor serve did not start listening:\n${this.log()}`);
  }

  log() {
    return readFileSync(this.logPath, 'utf8').slice(-8000);
  }

  job(id) {
    return this.admin.getJob(id);
  }

  async waitJob(id, pred, timeoutMs = 30_000) {
    const deadline = Date.now() + timeoutMs;
    let job = await this.job(id);
    while (!pred(job)) {
      if (Date.now() > deadline) {
        throw new Error(`job ${id} did not reach the expected state in ${timeoutMs} ms: ${JSON.stringify(job, null, 1)}`);
      }
      await sleep(50);
      job = await this.job(id);
    }
    return job;
  }

  async close() {
    if (this.proc.exitCode === null) {
      const exited = new Promise((r) => this.proc.once('exit', r));
      this.proc.kill('SIGTERM');
      await Promise.race([exited, sleep(20_000, undefined, { ref: false })]);
      if (this.proc.exitCode === null) this.proc.kill('SIGKILL');
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export async function waitUntil(pred, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for: ${what}`);
    await sleep(20);
  }
}
