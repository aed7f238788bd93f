// A Node.js client of triage.v1, as a fleet written in JavaScript would be: the proto loaded at
// run time by @grpc/proto-loader, calls made with @grpc/grpc-js, the prediction batch built and
// the decisions decoded with apache-arrow.
//
//   node triage_client.mjs ADDRESS PROTO INPUT.json OUTPUT.json
//
// INPUT.json: {"token": "..." or null, "batches": [{"id": [...], "logits": [[[...] x C] x M],
// "source": [...]}, ...]}, a logit that is not finite as "NaN", "Infinity" or "-Infinity". Each
// batch is sent as one unary Triage call; then the first batch goes once more through
// TriageStream and once with a wrong token. OUTPUT.json: per call the decision columns as JSON
// (NaN as "NaN", int64 as strings), the response's counters, the decisions' Arrow schema as
// apache-arrow reads it, the trailing metadata, and the wrong token's status.
import { readFileSync, writeFileSync } from "node:fs";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import * as arrow from "apache-arrow";

const [address, protoPath, inputPath, outputPath] = process.argv.slice(2);
const input = JSON.parse(readFileSync(inputPath, "utf8"));

const definition = protoLoader.loadSync(protoPath, { keepCase: true, longs: String, enums: String, defaults: true });
const triage = grpc.loadPackageDefinition(definition).triage.v1;
const client = new triage.Triage(address, grpc.credentials.createInsecure(), {
  "grpc.max_receive_message_length": 64 << 20,
  "grpc.max_send_message_length": 64 << 20,
});

// The data contract: id string, logits fixed_size_list<fixed_size_list<float32>[C]>[M], source string.
function predictionBatch({ id, logits, source }) {
  const rows = logits.length;
  const members = logits[0].length;
  const classes = logits[0][0].length;
  const values = new Float32Array(rows * members * classes);
  let at = 0;
  // JSON has no NaN or infinity: those come as the strings "NaN", "Infinity", "-Infinity".
  for (const row of logits) for (const member of row) for (const z of member) values[at++] = Number(z);
  const classType = new arrow.FixedSizeList(classes, new arrow.Field("item", new arrow.Float32(), true));
  const memberType = new arrow.FixedSizeList(members, new arrow.Field("item", classType, true));
  const floats = arrow.makeData({ type: new arrow.Float32(), length: values.length, data: values });
  const perMember = arrow.makeData({ type: classType, length: rows * members, child: floats });
  const perRow = arrow.makeData({ type: memberType, length: rows, child: perMember });
  const table = new arrow.Table({
    id: arrow.vectorFromArray(id, new arrow.Utf8()),
    logits: arrow.makeVector(perRow),
    source: arrow.vectorFromArray(source, new arrow.Utf8()),
  });
  return arrow.tableToIPC(table, "stream");
}

function jsonValue(v) {
  if (typeof v === "bigint") return v.toString();
  if (typeof v === "number" && Number.isNaN(v)) return "NaN";
  return v;
}

function decode(response) {
  const table = arrow.tableFromIPC(response.arrow_ipc);
  const columns = {};
  for (const field of table.schema.fields) {
    columns[field.name] = Array.from(table.getChild(field.name), jsonValue);
  }
  return {
    rows: Number(response.rows),
    escalated: Number(response.escalated),
    profile_version: response.profile_version,
    schema: table.schema.fields.map((f) => [f.name, String(f.type)]),
    columns,
  };
}

function metadata(token) {
  const md = new grpc.Metadata();
  if (token) md.add("authorization", `Bearer ${token}`);
  return md;
}

// grpc-js calls back with the response, then emits the status that carries the trailing metadata.
function unary(ipc, token) {
  return new Promise((resolve) => {
    let answer = null;
    const call = client.Triage({ arrow_ipc: Buffer.from(ipc) }, metadata(token), (error, response) => {
      answer = error ? { error: { code: grpc.status[error.code], details: error.details } } : decode(response);
    });
    call.on("status", (status) => resolve({ ...answer, trailing: status.metadata.getMap() }));
  });
}

function stream(ipcs, token) {
  return new Promise((resolve, reject) => {
    const answers = [];
    const call = client.TriageStream(metadata(token));
    call.on("data", (response) => answers.push(decode(response)));
    call.on("error", reject);
    call.on("end", () => resolve(answers));
    for (const ipc of ipcs) call.write({ arrow_ipc: Buffer.from(ipc) });
    call.end();
  });
}

const requests = input.batches.map(predictionBatch);
const output = { unary: [], stream: null, wrong_token: null };
for (const ipc of requests) output.unary.push(await unary(ipc, input.token));
output.stream = await stream(requests.slice(0, 1), input.token);
output.wrong_token = (await unary(requests[0], "not-a-token")).error ?? null;
writeFileSync(outputPath, JSON.stringify(output));
client.close();
