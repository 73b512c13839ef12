// Bundle js/src into rf_notebook/static/widget.js (ESM, minified) with Bokeh inside: no CDN at render time.
// MathJax (only for LaTeX labels, which the panel never uses) is replaced by a stub: 2.5 MB less.
import * as esbuild from "esbuild";
import { statSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";

// BokehJS's compiled modules declare class fields that its constructors have already set (`active_changed;`);
// with JavaScript's define semantics those declarations reset them to undefined. Loading them as TypeScript
// with useDefineForClassFields=false drops the bare declarations, as BokehJS's own build does.
const bokehAsTypeScript = {
  name: "bokeh-as-typescript",
  setup(build) {
    build.onLoad({ filter: /@bokeh[\\/]bokehjs[\\/].*\.js$/ }, async (args) => ({
      contents: await readFile(args.path, "utf8"),
      loader: "ts",
    }));
  },
};

const stubMathJax = {
  name: "stub-mathjax",
  setup(build) {
    build.onResolve({ filter: /(^mathjax-full|\/mathjax(\/index(\.js)?)?$)/ }, (args) => ({ path: args.path, namespace: "mathjax-stub" }));
    build.onLoad({ filter: /.*/, namespace: "mathjax-stub" }, () => ({
      contents: "export function tex2svg() { throw new Error('MathJax is not bundled'); }\n" +
        "export const mathml2svg = tex2svg, ascii2svg = tex2svg;\n",
      loader: "js",
    }));
  },
};

const outfile = "../rf_notebook/static/widget.js";
await esbuild.build({
  entryPoints: ["src/index.js"],
  bundle: true,
  format: "esm",
  minify: true,
  target: "es2020",
  outfile,
  legalComments: "none",
  define: { "define.amd": "false" }, // pages that load require.js must not capture Bokeh's modules
  tsconfigRaw: { compilerOptions: { useDefineForClassFields: false } },
  plugins: [stubMathJax, bokehAsTypeScript],
  logLevel: "warning",
});
await esbuild.build({
  entryPoints: ["src/widget.css"],
  bundle: true,
  minify: true,
  outfile: "../rf_notebook/static/widget.css",
  logLevel: "warning",
});
const bytes = statSync(outfile).size;
const gzipped = gzipSync(readFileSync(outfile)).length;
console.log(`widget.js: ${(bytes / 1024).toFixed(0)} KiB, ${(gzipped / 1024).toFixed(0)} KiB gzipped`);
