// llama.cpp (through node-llama-cpp's prebuilt CPU binaries) on a GGUF file: the prompt's token ids and N greedily
// generated ones, printed as one JSON line. tests/test_gguf.py compares them with ours and transformers'.
//
//   node tools/llama_greedy.mjs MODULES_DIR MODEL.gguf PROMPT N
//
// MODULES_DIR is the folder node-llama-cpp was installed into (npm install --prefix MODULES_DIR ...): the package is
// imported from there, so nothing is installed into the checkout's own tree.
import path from "node:path";
import {pathToFileURL} from "node:url";

const [modulesDir, modelPath, prompt, count] = process.argv.slice(2);
const entry = path.join(path.resolve(modulesDir), "node_modules", "node-llama-cpp", "dist", "index.js");
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(entry).href);

// never build from source, never look for a GPU: the prebuilt CPU binaries or an error
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
const promptIds = model.tokenize(prompt, false);  // as text: "<s>" written in the prompt is not the bos id
const wanted = Number(count);
const context = await model.createContext({contextSize: promptIds.length + wanted, sequences: 1});
const generated = [];
if (wanted > 0) {
    // temperature 0 is argmax; no repetition penalty or other sampler is applied unless asked for
    for await (const token of context.getSequence().evaluate(promptIds, {temperature: 0})) {
        generated.push(token);
        if (generated.length >= wanted) break;
    }
}
console.log(JSON.stringify({prompt: promptIds, generated, llama_cpp: llama.llamaCppRelease}));
await context.dispose();
await model.dispose();
await llama.dispose();
