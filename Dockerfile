# syntax=docker/dockerfile:1
# One image for the API and the worker; the command chooses which:
#   API (default):  node dist/server/main.js
#   worker:         node --max-semi-space-size=8 dist/worker/main.js
# The build stage compiles the TypeScript to dist/ (npm run build) and builds the
# browser page; the image runs JavaScript, not TypeScript through tsx (20-50 MB less
# memory per process, nothing compiled at start).

# Node 24 LTS, the same major as the `node` package in package.json, pinned exactly.
ARG NODE_IMAGE=node:24.21.0-bookworm-slim

FROM ${NODE_IMAGE} AS build
WORKDIR /app
COPY package.json package-lock.json ./
# --ignore-scripts: the `node` npm package's install script would download a second
# Node 24 into node_modules; the image has its own. Nothing else here needs an install
# script (esbuild and msgpackr load their platform packages without one).
RUN npm ci --ignore-scripts --no-audit --no-fund \
 && rm -rf node_modules/node node_modules/.bin/node
COPY . .
# The browser page (clients/web -> clients/web/dist) when this checkout has the script;
# the empty folder otherwise keeps the COPY below valid.
RUN npm run build:web --if-present && mkdir -p clients/web/dist \
 && npm run build

FROM ${NODE_IMAGE} AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund \
 && rm -rf node_modules/node node_modules/.bin/node \
 && npm cache clean --force

FROM ${NODE_IMAGE} AS runtime
ENV NODE_ENV=production \
    HOST=0.0.0.0 \
    PORT=8080
WORKDIR /app
# Code and dependencies stay owned by root: the service user can read, not rewrite them.
COPY --from=deps /app/node_modules ./node_modules
COPY . .
COPY --from=build /app/clients/web/dist ./clients/web/dist
COPY --from=build /app/dist ./dist
USER node
EXPOSE 8080
# Slim images have no curl: Node's fetch probes /healthz, on the worker's probe port
# when WORKER_HEALTH_PORT is set, else on the API port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["node", "-e", "const w = Number(process.env.WORKER_HEALTH_PORT || 0); const p = w > 0 ? w : Number(process.env.PORT || 8080); fetch('http://127.0.0.1:' + p + '/healthz').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1));"]
CMD ["node", "dist/server/main.js"]
