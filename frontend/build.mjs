// Bundles the console's dashboards into dist/ (served by Django's staticfiles as console/).
import { build } from "esbuild";
import { rmSync } from "node:fs";

const watch = process.argv.includes("--watch");
rmSync(new URL("./dist", import.meta.url), { recursive: true, force: true });

const options = {
  // CSS imported by the JS comes out beside it as console.css.
  entryPoints: { console: "src/main.js" },
  bundle: true,
  format: "esm",
  target: ["es2020"],
  minify: !watch,
  sourcemap: true,
  outdir: "dist",
  logLevel: process.argv.includes("--quiet") ? "warning" : "info",
};

if (watch) {
  const { context } = await import("esbuild");
  const ctx = await context(options);
  await ctx.watch();
} else {
  await build(options);
}
