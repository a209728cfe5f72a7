// Drives the platform's own SDKs, unmodified, through quotagate for tests/test_sdk.py.
//
//   node drive.js <scenario> '<json args>'      prints one line "RESULT <json>" at the end
//
// Only the SDKs' endpoints are pointed at the gateway, through their own settings: js-sdk's
// registerHost / registerEndPointWithKey after init (init resets them), node-sdk's serviceUrl.
// Host names are the platform's ({env}.api.tcloudbasegateway.com,
// {env}.{region}.tcb-api.tencentcloudapi.com): the test resolves them to 127.0.0.1 in a private
// /etc/hosts, so the gateway reads the environment from the host as it would in production.
// Node 20 has no global WebSocket; the js-sdk's realtime uses the `ws` package's (what its Node
// adapter itself loads when it can resolve `ws`). TENCENTCLOUD=true (the SDKs' own switch)
// keeps them from probing a cloud metadata server.
'use strict'
globalThis.WebSocket = require('ws')
const cloudbase = require('@cloudbase/js-sdk')
const tcb = require('@cloudbase/node-sdk')

// An app must handle this: js-sdk rejects an internal promise nobody awaits when a server
// ERROR answers INIT_WATCH (its onError still gets the error); Node 20 would exit on it.
const unhandled = []
process.on('unhandledRejection', e => unhandled.push(String((e && e.message) || e).slice(0, 200)))
for (const level of ['log', 'warn', 'info', 'debug']) console[level] = () => {} // SDK chatter

const [scenario, rawArgs] = process.argv.slice(2)
const args = JSON.parse(rawArgs || '{}')
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

function fields (e) {
  if (!e || typeof e !== 'object') return { value: String(e) }
  const out = { ctor: e.constructor && e.constructor.name }
  for (const k of Object.getOwnPropertyNames(e)) {
    if (k !== 'stack' && k !== 'response') out[k] = typeof e[k] === 'object' ? JSON.parse(JSON.stringify(e[k] || null)) : e[k]
  }
  return out
}
const settle = p => p.then(v => ({ resolved: JSON.parse(JSON.stringify(v, (k, x) => (k === 'response' ? undefined : x))) }),
  e => ({ rejected: fields(e) }))

function gatewayApp (env, mode = 'GATEWAY') {
  const port = args.port
  if (mode === 'GATEWAY') {
    const app = cloudbase.init({ env })
    app.registerHost(`${env}.api.tcloudbasegateway.com:${port}`, 'http')
    return app
  }
  const app = cloudbase.init({ env, endPointMode: 'CLOUD_API', accessKey: 'publishable-key' })
  app.registerEndPointWithKey({ key: 'CLOUD_API', url: `//${env}.ap-shanghai.tcb-api.tencentcloudapi.com:${port}/web`, protocol: 'http' })
  app.registerEndPointWithKey({ key: 'GATEWAY', url: `//${env}.api.tcloudbasegateway.com:${port}/v1`, protocol: 'http' })
  return app
}

function nodeApp (env) {
  return tcb.init({ env, secretId: 'AKIDtest', secretKey: 'test-secret', serviceUrl: `http://${env}.tcb-api.tencentcloudapi.com:${args.port}/admin` })
}

async function calls (env) {
  const out = {}
  let app = gatewayApp(env)
  out.gateway = {
    fn: await settle(app.callFunction({ name: 'sum', data: { a: 1, b: 2 } })),
    db: await settle(app.database().collection('todos').where({}).get())
  }
  app = gatewayApp(env, 'CLOUD_API')
  out.cloudApi = {
    fn: await settle(app.callFunction({ name: 'sum', data: { a: 3, b: 4 } })),
    db: await settle(app.database().collection('todos').where({}).get())
  }
  const napp = nodeApp(env)
  out.node = {
    fn: await settle(napp.callFunction({ name: 'sum', data: { a: 5, b: 6 } })),
    db: await settle(napp.database().collection('todos').where({}).get())
  }
  return out
}

async function platformStats () {
  const r = await fetch(`http://127.0.0.1:${args.platform}/__stats`)
  return r.json()
}

/** One watch: resolves on its first change or error (or after `wait` ms). */
function watch (db, id, coll = 'todos', wait = 8000) {
  const seen = { id, changes: 0, errors: [] }
  return new Promise(resolve => {
    const timer = setTimeout(() => resolve({ ...seen, listener, timeout: true }), wait)
    const listener = db.collection(coll).doc(id).watch({
      onChange: () => { seen.changes++; clearTimeout(timer); resolve({ ...seen, listener }) },
      onError: e => {
        seen.errors.push(JSON.stringify(fields(e)).slice(0, 400))
        clearTimeout(timer)
        resolve({ ...seen, listener })
      }
    })
    seen.listener = listener
  }).then(result => { result.seen = seen; return result })
}
const outcome = w => (w.changes ? 'change' : w.errors.length ? 'error' : 'none')

async function watches () {
  const app = gatewayApp(args.env)
  await app.auth.signInAnonymously()
  const db = app.database()
  const log = {}
  const opened = []
  for (const id of ['a', 'b', 'c', 'd']) opened.push(await watch(db, id)) // cap is 3
  log.atCap = opened.map(outcome)
  log.refusal = opened[3].errors.join(' ')
  opened[0].listener.close() // CLOSE_WATCH frees a slot
  await sleep(300)
  const e = await watch(db, 'e')
  log.afterClose = outcome(e)
  opened[2].listener.close()
  await sleep(300)
  const later = await watch(db, 'later-error') // then a server ERROR, no CLOSE_WATCH sent
  await sleep(600)
  log.laterError = { first: outcome(later), errors: later.seen.errors.length }
  const g = await watch(db, 'g') // fits only if the ERROR freed that slot
  log.afterServerError = outcome(g)
  g.listener.close()
  await sleep(300)
  const before = await platformStats()
  const cut = await watch(db, 'cut') // the platform drops the socket: the SDK reconnects
  log.cutFirst = outcome(cut)
  const deadline = Date.now() + 15000
  let now = before
  while (Date.now() < deadline) {
    now = await platformStats()
    if (now.logins > before.logins && now.inits >= before.inits + 4) break // cut + 3 rebuilds
    await sleep(200)
  }
  log.reconnected = now.logins > before.logins
  log.rebuilt = now.inits - before.inits - 1
  await sleep(500)
  const over = await watch(db, 'over') // b, e, cut held again: the cap stands
  log.afterReconnect = outcome(over)
  log.closeCodesBeforeEnd = now.closeCodes
  for (const w of [opened[1], e, cut]) w.listener.close()
  await sleep(800)
  log.closeCodes = (await platformStats()).closeCodes
  log.unhandled = unhandled
  return log
}

async function waitLine () {
  return new Promise(resolve => process.stdin.once('data', resolve))
}

async function isolated () {
  const app = gatewayApp(args.env)
  await app.auth.signInAnonymously()
  const w = await watch(app.database(), 'x')
  process.stderr.write('READY\n')
  await waitLine() // the test isolates the environment now
  const deadline = Date.now() + 15000
  while (Date.now() < deadline && w.seen.errors.length === 0) await sleep(100)
  const logins = (await platformStats()).logins
  await sleep(3000) // a client told 3050 stops: no reconnection
  return { first: outcome(w), errors: w.seen.errors, loginsAfter: (await platformStats()).logins - logins }
}

/** An app whose environment is isolated (or released): it signs in (args.pause: then waits
 * for a line on stdin, while the test isolates the environment), opens a watch (args.wait ms
 * for its onChange or onError, and how long it took), then makes a function call, a query and
 * an add in both endpoint modes, each as the app sees it. */
async function lapsed () {
  const app = gatewayApp(args.env)
  const db = app.database()
  const out = {}
  out.signIn = await app.auth.signInAnonymously().then(() => ({ resolved: true }),
    e => ({ rejected: fields(e) }))
  if (args.pause) {
    process.stderr.write('READY\n')
    await waitLine()
  }
  if (args.wait) {
    const started = Date.now()
    const w = await watch(db, 'x', 'todos', args.wait)
    out.watch = { outcome: outcome(w), errors: w.seen.errors, timeout: Boolean(w.timeout), ms: Date.now() - started }
    try { w.listener.close() } catch (e) { out.watch.closeError = String(e).slice(0, 200) }
  }
  out.gateway = {
    fn: await settle(app.callFunction({ name: 'sum', data: { a: 1, b: 2 } })),
    db: await settle(db.collection('todos').where({}).get()),
    add: await settle(db.collection('todos').add({ n: 1 }))
  }
  const capp = gatewayApp(args.env, 'CLOUD_API')
  out.cloudApi = {
    fn: await settle(capp.callFunction({ name: 'sum', data: { a: 3, b: 4 } })),
    add: await settle(capp.database().collection('todos').add({ n: 2 }))
  }
  out.unhandled = unhandled
  return out
}

/** One watch of "flood-<events>": every snapshot's document number, and the seconds from
 * the first snapshot (INIT) to the last. */
async function flood () {
  const app = gatewayApp(args.env)
  await app.auth.signInAnonymously()
  const seen = { ns: [], errors: [], seconds: null, timeout: false }
  const at = []
  await new Promise(resolve => {
    const timer = setTimeout(() => { seen.timeout = true; resolve() }, 60000)
    const listener = app.database().collection('todos').doc(`flood-${args.events}`).watch({
      onChange: snapshot => {
        const doc = snapshot.docs[0] || {}
        seen.ns.push(doc.n)
        at.push(Date.now())
        if (doc.n === args.events) { clearTimeout(timer); listener.close(); resolve() }
      },
      onError: e => {
        seen.errors.push(JSON.stringify(fields(e)).slice(0, 400))
        clearTimeout(timer)
        resolve()
      }
    })
  })
  if (at.length) seen.seconds = (at[at.length - 1] - at[0]) / 1000
  seen.unhandled = unhandled
  return seen
}

const scenarios = { calls: () => calls(args.env), watches, isolated, lapsed, flood }

scenarios[scenario]().then(result => {
  process.stdout.write('RESULT ' + JSON.stringify(result) + '\n')
  setTimeout(() => process.exit(0), 100)
}, e => {
  process.stdout.write('RESULT ' + JSON.stringify({ failed: fields(e) }) + '\n')
  setTimeout(() => process.exit(1), 100)
})
