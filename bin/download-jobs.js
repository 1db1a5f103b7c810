#!/usr/bin/env node
// The `download-jobs` command: runs the TypeScript CLI through tsx, so a checkout needs
// no build step (tsx is a runtime dependency of this package).
import { register } from "tsx/esm/api";

register();
await import("../clients/cli/main.ts");
