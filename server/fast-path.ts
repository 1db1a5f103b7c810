import {
  contentTypeStreamRegExp,
  contentTypeUnaryRegExp,
} from "@connectrpc/connect/protocol-connect";
import {
  type FastPathDeps,
  isIdentity,
  type NodeRequest,
  type NodeResponse,
} from "./fast-connect.js";
import { createFastGrpcStatus } from "./fast-grpc.js";
import { createFastInitiate } from "./fast-initiate.js";
import { createFastStatus, createStatusAnswers } from "./fast-status.js";
import { createFastWatch } from "./fast-watch.js";

// Routes the hot calls to their lean handlers, in front of connectNodeAdapter: GetStatus
// over Connect unary and gRPC (polling), WatchJob over Connect streaming (fan-out), and
// Initiate over Connect unary (every job starts with it). Only requests the lean
// handlers serve exactly as connect-node would are taken: plain Connect JSON or binary,
// gRPC binary, uncompressed. gRPC JSON, gRPC-Web, compressed requests, unknown content
// types and methods go to connect-node, which answers them as before.

export type { FastPathDeps } from "./fast-connect.js";

const SERVICE = "/downloads.v1.DownloadService/";
const GET_STATUS = `${SERVICE}GetStatus`;
const WATCH_JOB = `${SERVICE}WatchJob`;
const INITIATE = `${SERVICE}Initiate`;

/** Returns true when it has taken the request; false leaves it to connect-node. */
export type FastPath = (req: NodeRequest, res: NodeResponse) => boolean;

export function createFastPath(deps: FastPathDeps): FastPath {
  const answers = createStatusAnswers(deps);
  const getStatus = createFastStatus(deps, answers);
  const grpcGetStatus = createFastGrpcStatus(deps, answers);
  const watchJob = createFastWatch(deps);
  const initiate = createFastInitiate(deps);

  return (req, res) => {
    const url = req.url ?? "";
    if (!url.startsWith(SERVICE)) return false;
    const q = url.indexOf("?");
    const path = q === -1 ? url : url.slice(0, q);
    const headers = req.headers;

    if (path === GET_STATUS) {
      if (req.method === "POST") {
        const type = headers["content-type"];
        if (type === "application/grpc" || type === "application/grpc+proto") {
          if (req.httpVersionMajor !== 2 || !isIdentity(headers["grpc-encoding"])) return false;
          void grpcGetStatus(req, res);
          return true;
        }
        if (
          type === undefined ||
          !contentTypeUnaryRegExp.test(type) ||
          !isIdentity(headers["content-encoding"])
        ) {
          return false;
        }
        void getStatus(req, res, { method: "POST", binary: isProto(type) });
        return true;
      }
      if (req.method === "GET" && q !== -1) {
        const params = new URLSearchParams(url.slice(q + 1));
        const encoding = params.get("encoding");
        if ((encoding !== "json" && encoding !== "proto") || params.has("compression"))
          return false;
        void getStatus(req, res, { method: "GET", binary: encoding === "proto", params });
        return true;
      }
      return false;
    }

    if (path === INITIATE && req.method === "POST") {
      const type = headers["content-type"];
      if (
        type === undefined ||
        !contentTypeUnaryRegExp.test(type) ||
        !isIdentity(headers["content-encoding"])
      ) {
        return false;
      }
      void initiate(req, res, isProto(type));
      return true;
    }

    if (path === WATCH_JOB && req.method === "POST") {
      const type = headers["content-type"];
      if (
        type === undefined ||
        !contentTypeStreamRegExp.test(type) ||
        !isIdentity(headers["connect-content-encoding"])
      ) {
        return false;
      }
      void watchJob(req, res, isProto(type));
      return true;
    }
    return false;
  };
}

function isProto(contentType: string): boolean {
  return contentType.toLowerCase().endsWith("proto");
}
