// Drives the daemon's Piston v2 API with the real `piston-client` package from npm, the way
// its users call it, and prints one JSON line per case: {"case": NAME, "result": ...}.
// `tests/piston_api.rs` starts the daemon, runs `node tests/piston-client/run.mjs URL` and
// checks every line. Install with `npm ci --prefix tests/piston-client`.
import piston from "piston-client";

const server = process.argv[2];
if (!server) {
  console.error("usage: node run.mjs http://127.0.0.1:PORT");
  process.exit(2);
}
const client = piston({ server });

const report = (name, result) => {
  // The client returns `{success: false, error}` on a network failure; keep the error's text.
  if (result && result.error instanceof Error) {
    result = { ...result, error: String(result.error) };
  }
  console.log(JSON.stringify({ case: name, result }));
};

const runtimes = await client.runtimes();
report("runtimes", runtimes);
const has = (language) => Array.isArray(runtimes) && runtimes.some((r) => r.language === language);

// The client's defaults: the latest version listed for the language, args ["1", "2", "3"],
// run_timeout 3000, compile_timeout 10000, memory limits -1.
report("python", await client.execute("python", 'import sys\nprint("hello from python", sys.argv[1:])'));
report(
  "javascript-args",
  await client.execute("javascript", 'console.log(process.argv.slice(2).join(","))', {
    args: ["a", "b c"],
  }),
);
report(
  "bash-stdin",
  await client.execute("bash", 'read -r name; echo "hello, $name"; echo oops >&2; exit 3', {
    stdin: "piston",
    args: [],
  }),
);
report(
  "python-files",
  await client.execute({
    language: "python",
    version: "3",
    files: [
      { name: "main.py", content: "from helper import greet\nprint(greet())" },
      { name: "helper.py", content: "def greet():\n    return 'hi from a second file'" },
    ],
    args: [],
  }),
);
if (has("c")) {
  report(
    "c",
    await client.execute("c", '#include <stdio.h>\nint main(int c, char **v) { printf("%d %s\\n", c - 1, v[1]); return 0; }'),
  );
  report("c-compile-error", await client.execute("c", "int main( {"));
}
report("timeout", await client.execute("python", "while True:\n    pass", { runTimeout: 500, args: [] }));
// No runtime lists the language, so the client finds no version and sends none: Piston's 400.
report("unknown-language", await client.execute("cobol", "DISPLAY 'HI'."));
