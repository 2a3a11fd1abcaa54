// Token endpoint for tests/interop_oauth2_mock_server.rs: a real oauth2-mock-server on
// 127.0.0.1 with an OS-assigned port, issuing short-lived RS256 JWTs.
//
// Usage: node server.js [TOKEN_LIFETIME_SECONDS]   (default 2)
//
// Prints one JSON line to stdout once it listens:
//   {"url":"http://127.0.0.1:PORT","issuer":"http://localhost:PORT","token_lifetime":2}
// `url` is where to connect; `issuer` is the `iss` claim of the tokens (oauth2-mock-server
// names loopback issuers `localhost`). Exits when its stdin closes, so the test that spawned
// it never leaves it behind.
//
// oauth2-mock-server accepts any client id and secret, by any client authentication method,
// and its discovery document says `token_endpoint_auth_methods_supported: ["none"]`. So this
// script records what each token request actually carried, and serves the record at
// `GET /interop/token-requests` for the test to assert on.
//
// For the refresh_token grant, oauth2-mock-server 9.3.0 answers every request with a new
// access token, a new random refresh token, an id_token, and `scope` as requested or "dummy"
// when the request names none; it never checks the refresh token presented, nor that there is
// one. This script makes it an authorization server that rotates refresh tokens: it keeps the
// refresh tokens the server issued (by any grant) and not yet used, lets each be used once,
// and answers any other with 400 `invalid_grant`.

import { randomUUID } from 'node:crypto';
import process from 'node:process';

import { Events, OAuth2Server } from 'oauth2-mock-server';

const tokenLifetime = Number.parseInt(process.argv[2] ?? '2', 10);
if (!Number.isInteger(tokenLifetime) || tokenLifetime < 1) {
  console.error(`server.js: bad token lifetime ${JSON.stringify(process.argv[2])}`);
  process.exit(2);
}

// What the token endpoint saw, by client authentication method.
const record = {
  total: 0,
  // `public`: a client_id in the body and no secret anywhere.
  by_method: { basic: 0, request_body: 0, both: 0, public: 0, none: 0 },
  // Distinct "method client_id client_secret" triples, decoded as RFC 6749 §2.3.1 says; a
  // public client's is "public client_id".
  credentials: [],
  grant_types: [],
  scopes: [],
  // The refresh_token grant: requests refused, and for each accepted one, in order, the
  // refresh token presented and the one issued in exchange.
  refresh: { refused: 0, chain: [] },
};

// Refresh tokens issued and not used yet.
const liveRefreshTokens = new Set();

// RFC 6749 §2.3.1: the id and secret in HTTP Basic are form-urlencoded first.
function formDecode(text) {
  return decodeURIComponent(text.replace(/\+/g, ' '));
}

function basicCredentials(req) {
  const header = req.headers.authorization ?? '';
  const match = /^Basic\s+([A-Za-z0-9+/=]+)\s*$/i.exec(header);
  if (match === null) return undefined;

  const decoded = Buffer.from(match[1], 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon < 0) return undefined;
  return {
    id: formDecode(decoded.slice(0, colon)),
    secret: formDecode(decoded.slice(colon + 1)),
  };
}

function bodyCredentials(req) {
  const body = req.body ?? {};
  if (body.client_id === undefined && body.client_secret === undefined) return undefined;
  return { id: body.client_id, secret: body.client_secret };
}

function remember(list, value) {
  if (!list.includes(value)) list.push(value);
}

function recordTokenRequest(req) {
  const basic = basicCredentials(req);
  const inBody = bodyCredentials(req);

  let method = 'none';
  if (basic !== undefined && inBody !== undefined) method = 'both';
  else if (basic !== undefined) method = 'basic';
  else if (inBody !== undefined && inBody.secret === undefined) method = 'public';
  else if (inBody !== undefined) method = 'request_body';

  record.total += 1;
  record.by_method[method] += 1;
  for (const credentials of [basic, inBody]) {
    if (credentials === undefined) continue;
    if (method === 'public') remember(record.credentials, `public ${credentials.id}`);
    else remember(record.credentials, `${method} ${credentials.id} ${credentials.secret}`);
  }
  remember(record.grant_types, String(req.body?.grant_type));
  remember(record.scopes, String(req.body?.scope));
}

const server = new OAuth2Server();
await server.issuer.keys.generate('RS256');

// Short-lived tokens. `exp` is rounded up to a whole second, so the JWT never expires before
// the `expires_in` the client is told; a unique `jti` keeps two tokens issued in the same
// second apart.
server.service.on(Events.BeforeTokenSigning, (token) => {
  const now = Date.now() / 1000;
  token.payload.iat = Math.floor(now);
  token.payload.exp = Math.ceil(now) + tokenLifetime;
  token.payload.jti = randomUUID();
});

// Single-use refresh tokens, checked before the answer leaves.
function checkRefreshToken(response, req) {
  const presented = req.body?.refresh_token;
  if (typeof presented === 'string' && liveRefreshTokens.delete(presented)) {
    record.refresh.chain.push({ presented, issued: response.body.refresh_token });
    return;
  }
  record.refresh.refused += 1;
  response.statusCode = 400;
  response.body = {
    error: 'invalid_grant',
    error_description: 'refresh token unknown or already used',
  };
}

server.service.on(Events.BeforeResponse, (response, req) => {
  recordTokenRequest(req);
  if (response.statusCode === 200 && req.body?.grant_type === 'refresh_token') {
    checkRefreshToken(response, req);
  }
  if (response.statusCode === 200) {
    response.body.expires_in = tokenLifetime;
    if (typeof response.body.refresh_token === 'string') {
      liveRefreshTokens.add(response.body.refresh_token);
    }
  }
});

server.service.addRoute('GET', '/interop/token-requests', (_req, res) => {
  const content = JSON.stringify(record);
  res.statusCode = 200;
  res.setHeader('Content-Type', 'application/json');
  res.setHeader('Content-Length', Buffer.byteLength(content));
  res.end(content);
});

await server.start(0, '127.0.0.1');

const { port } = server.address();
process.stdout.write(
  `${JSON.stringify({
    url: `http://127.0.0.1:${port}`,
    issuer: server.issuer.url,
    token_lifetime: tokenLifetime,
  })}\n`,
);

// The parent closing our stdin (or dying) is the signal to stop.
process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
