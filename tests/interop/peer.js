// An ocpp-rpc station or CSMS driven over stdin/stdout by tests/interop/__init__.py.
//
// ocpp-rpc (https://github.com/mikuso/ocpp-rpc) is an OCPP-J implementation independent of the
// Python `ocpp` library: its own framing and its own copy of the OCPP 1.6 / 2.0.1 / 2.1 JSON
// schemas. strictMode validates every CALL and answer it sends or receives against them.
//
// usage: node peer.js csms <subprotocol> [port]
//        node peer.js station <subprotocol> <endpoint> <identity>
// stdout, one JSON object a line: {"event":"listening","port":N} | {"event":"connected","protocol":P}
//   | {"event":"frame","dir":"sent"|"received","text":T} | {"event":"answer","id":I,"result":R}
//   | {"event":"error","id":I,"error":E} | {"event":"closed","code":C}
// stdin, one JSON object a line: {"id":I,"call":"Action","params":{...}} (the CSMS calls its one station)
'use strict';
const readline = require('readline');
const { RPCServer, RPCClient, createValidator } = require('ocpp-rpc');

const [role, protocol, endpoint, identity] = process.argv.slice(2);  // csms: endpoint is the port
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const now = () => new Date().toISOString();

// Answers valid in 2.0.1 and 2.1 (and for the station's side, what a compliant station says).
const CSMS_ANSWERS = {
    BootNotification: () => ({ currentTime: now(), interval: 300, status: 'Accepted' }),
    Heartbeat: () => ({ currentTime: now() }),
    Authorize: () => ({ idTokenInfo: { status: 'Accepted' } }),
    TransactionEvent: (p) => (p.idToken ? { idTokenInfo: { status: 'Accepted' } } : {}),
    DataTransfer: () => ({ status: 'Accepted' }),
};
const STATION_ANSWERS = {
    SetChargingProfile: () => ({ status: 'Accepted' }),
    ClearChargingProfile: () => ({ status: 'Accepted' }),
    TriggerMessage: () => ({ status: 'Accepted' }),
    DataTransfer: () => ({ status: 'Accepted' }),
};

// ocpp-rpc 2.2.1 ships the OCA's OCPP 2.1 schemas under their own ids ("urn:AuthorizeRequest") but
// looks them up as "urn:Authorize.req" / ".conf", so its strict mode cannot find any 2.1 schema. The
// same schemas, registered under the ids it looks up, fix that; validation stays ocpp-rpc's.
function validators() {
    const schemas = require('ocpp-rpc/lib/schemas/ocpp2_1.json').map((schema) => ({
        ...schema,
        $id: schema.$id.replace(/Request$/, '.req').replace(/Response$/, '.conf'),
    }));
    return [createValidator('ocpp2.1', schemas)];
}

function attach(client, answers) {
    client.on('message', ({ message, outbound }) => {
        out({ event: 'frame', dir: outbound ? 'sent' : 'received', text: message.toString() });
    });
    client.on('close', ({ code }) => out({ event: 'closed', code }));
    client.handle(({ method, params }) => (answers[method] ? answers[method](params) : {}));
}

function commands(target) {
    const rl = readline.createInterface({ input: process.stdin });
    rl.on('line', async (line) => {
        const { id, call, params } = JSON.parse(line);
        try {
            out({ event: 'answer', id, result: await target().call(call, params) });
        } catch (err) {
            out({ event: 'error', id, error: String(err && err.message || err) });
        }
    });
    rl.on('close', () => process.exit(0));
}

async function main() {
    if (role === 'csms') {
        const server = new RPCServer({ protocols: [protocol], strictMode: true, strictModeValidators: validators() });
        let current = null;
        server.on('client', (client) => {
            current = client;
            attach(client, CSMS_ANSWERS);
        });
        const http = await server.listen(Number(endpoint || 0), '127.0.0.1');
        out({ event: 'listening', port: http.address().port });
        commands(() => current);
    } else {
        const client = new RPCClient({ endpoint, identity, protocols: [protocol], strictMode: true,
                                       strictModeValidators: validators(), reconnect: false, callTimeoutMs: 20000 });
        attach(client, STATION_ANSWERS);
        await client.connect();
        out({ event: 'connected', protocol: client.protocol });
        commands(() => client);
    }
}

main().catch((err) => {
    out({ event: 'fatal', error: String(err && err.stack || err) });
    process.exit(1);
});
