// A stub of the platform behind quotagate for tests/test_sdk.py: HTTP and a `ws` WebSocket
// server answering in the shapes @cloudbase/js-sdk 3.7.0 and @cloudbase/node-sdk 3.18.3
// expect (read from their sources). Only quotagate sits between it and the SDKs.
//
//   node platform.js <port> <wsUrl>     wsUrl: what auth.wsWebSign hands out (the gateway's /);
//                                       "{env}" in it is the signing environment
//
// Realtime, by the watched document id: "later-error" gets INIT_EVENT, then a server ERROR for
// the watch; "cut" gets INIT_EVENT, then the connection is dropped without a close frame;
// "flood-N" gets INIT_EVENT, then N NEXT_EVENT frames of a ~10 kB document (n = 1..N) written
// at once (their bytes in stats.floodBytes); any watch of collection "fail" is answered with
// an ERROR. GET /__stats (direct, not through the gateway) tells what it saw.
'use strict'
const http = require('http')
const { WebSocketServer } = require('ws')

const port = Number(process.argv[2] || 0)
const wsUrl = process.argv[3] || ''
const stats = { requests: [], closeCodes: [], inits: 0, logins: 0, openSockets: 0, floodBytes: 0 }
const DOCS = [{ _id: 'd1', n: 1 }, { _id: 'd2', n: 2 }]

function send (res, status, obj) {
  const body = JSON.stringify(obj)
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) })
  res.end(body)
}

function answerAction (res, body) {
  const requestId = 'platform-' + Date.now()
  switch (body.action) {
    case 'auth.wsWebSign':
      return send(res, 200, { requestId, data: { signStr: 'sign', wsUrl: wsUrl.replace('{env}', body.env), secretVersion: 1, envId: body.env } })
    case 'functions.invokeFunction': {
      const data = body.request_data ? JSON.parse(body.request_data) : {}
      return send(res, 200, { requestId, data: { response_data: JSON.stringify({ fn: body.function_name, sum: (data.a || 0) + (data.b || 0) }) } })
    }
    case 'database.queryDocument': // js-sdk CLOUD_API mode: plain objects
      return send(res, 200, { requestId, data: { list: DOCS, offset: 0, limit: 100 } })
    case 'database.getDocument': // node-sdk: EJSON strings
      return send(res, 200, { requestId, data: { list: DOCS.map(d => JSON.stringify(d)), offset: 0, limit: 100 } })
    default:
      return send(res, 200, { requestId, code: 'UNKNOWN_ACTION', message: String(body.action) })
  }
}

const server = http.createServer((req, res) => {
  let raw = ''
  req.on('data', chunk => { raw += chunk })
  req.on('end', () => {
    const url = new URL(req.url, 'http://platform')
    const path = url.pathname
    if (path === '/__stats') return send(res, 200, stats)
    stats.requests.push({ method: req.method, path: req.url, env: req.headers['x-cloudbase-env'] || null, body: raw.slice(0, 2000) })
    let body = {}
    try { body = raw ? JSON.parse(raw) : {} } catch { body = {} }
    let match
    if (req.method === 'POST' && (match = path.match(/^\/v1\/functions\/([^/]+)$/))) {
      return send(res, 200, { fn: match[1], sum: (body.a || 0) + (body.b || 0) })
    }
    if (req.method === 'GET' && /^\/v1\/database\/instances\/[^/]+\/databases\/[^/]+\/collections\/[^/]+\/documents$/.test(path)) {
      return send(res, 200, { list: DOCS, offset: 0, limit: 100 })
    }
    if (req.method === 'POST' && path === '/auth/v1/signin/anonymously') {
      return send(res, 200, { token_type: 'Bearer', access_token: 'token-anon', refresh_token: 'refresh-anon', expires_in: 7200, scope: 'anonymous', sub: 'anon-1' })
    }
    if (req.method === 'GET' && path === '/auth/v1/user/me') {
      return send(res, 200, { sub: 'anon-1', name: 'anonymous', is_anonymous: true, groups: [] })
    }
    if (req.method === 'POST' && (path === '/web' || path === '/admin')) return answerAction(res, body)
    send(res, 404, { code: 'NOT_FOUND', message: req.method + ' ' + path })
  })
})

const wss = new WebSocketServer({ server })
wss.on('connection', ws => {
  stats.openSockets++
  ws.on('close', code => { stats.openSockets--; stats.closeCodes.push(code) })
  ws.on('message', data => {
    let msg
    try { msg = JSON.parse(String(data)) } catch { return }
    const reply = frame => ws.send(JSON.stringify(frame))
    const data_ = msg.msgData || {}
    switch (msg.msgType) {
      case 'LOGIN':
        stats.logins++
        return reply({ requestId: msg.requestId, msgType: 'LOGIN_RES', msgData: { envId: data_.envId } })
      case 'INIT_WATCH':
      case 'REBUILD_WATCH': {
        stats.inits++
        if (data_.collName === 'fail') {
          return reply({ watchId: msg.watchId, requestId: msg.requestId, msgType: 'ERROR', msgData: { code: 'WATCH_FAILED', message: 'no such collection' } })
        }
        if (msg.msgType === 'REBUILD_WATCH') {
          return reply({ watchId: msg.watchId, requestId: msg.requestId, msgType: 'NEXT_EVENT', msgData: { queryID: data_.queryID, currEvent: data_.eventID, events: [] } })
        }
        const query = JSON.parse(data_.query || '{}')
        const docs = query._id ? [{ _id: query._id, n: 0 }] : DOCS
        const queryID = 'q-' + msg.watchId.slice(-8)
        reply({
          watchId: msg.watchId,
          requestId: msg.requestId,
          msgType: 'INIT_EVENT',
          msgData: { queryID, currEvent: 1, events: docs.map(d => ({ ID: 0, DataType: 'init', QueueType: 'init', DocID: d._id, Doc: JSON.stringify(d) })) }
        })
        const flood = /^flood-(\d+)$/.exec(query._id || '')
        if (flood) {
          for (let n = 1; n <= Number(flood[1]); n++) { // event ids follow INIT's (1)
            const doc = { _id: query._id, n, pad: 'x'.repeat(10000) }
            const frame = JSON.stringify({ watchId: msg.watchId, requestId: 'server-' + n, msgType: 'NEXT_EVENT', msgData: { queryID, currEvent: n + 1, events: [{ ID: n + 1, DataType: 'replace', QueueType: 'update', DocID: doc._id, Doc: JSON.stringify(doc) }] } })
            stats.floodBytes += Buffer.byteLength(frame)
            ws.send(frame)
          }
        } else if (query._id === 'later-error') {
          setTimeout(() => reply({ watchId: msg.watchId, requestId: 'server-' + Date.now(), msgType: 'ERROR', msgData: { code: 'WATCH_EXPIRED', message: 'the watch ended on the server' } }), 200)
        } else if (query._id === 'cut') {
          setTimeout(() => ws.terminate(), 200)
        }
        return
      }
      case 'PING':
        return reply({ requestId: msg.requestId, msgType: 'PONG', msgData: null })
      default: // CLOSE_WATCH, CHECK_LAST: no answer needed
    }
  })
})

server.listen(port, '127.0.0.1', () => console.log(JSON.stringify({ port: server.address().port })))
