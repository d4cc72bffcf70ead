// Greedy continuation of given token ids by llama.cpp itself (node-llama-cpp's prebuilt CPU binary), to check a
// GGUF export against transformers (tests/lib/test_gguf_export.py, README "GGUF for llama.cpp").
//   npm install --prefix DIR node-llama-cpp@3      (from the npm registry; ships prebuilt llama.cpp binaries)
//   NODE_PATH=DIR/node_modules node scripts/llamacpp_greedy.mjs MODEL.gguf '[1, 403, 407]' 24
// Prints {"out": [generated ids], "tokens": [llama.cpp's tokenization of the text in argv[5], if any]}.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.NODE_PATH || process.cwd(), "x.js"));
const { getLlama } = await import(require.resolve("node-llama-cpp"));
const [modelPath, idsJson, n, text] = process.argv.slice(2);
const llama = await getLlama({ gpu: false, build: "never", logLevel: "error" });
const model = await llama.loadModel({ modelPath });
const context = await model.createContext({ contextSize: 512, threads: 1 });
const sequence = context.getSequence();
const out = [];
for await (const token of sequence.evaluate(JSON.parse(idsJson), { temperature: 0 })) {
  out.push(token);
  if (out.length >= Number(n)) break;
}
console.log(JSON.stringify({ out, tokens: text ? Array.from(model.tokenize(text)) : [] }));
process.exit(0);
