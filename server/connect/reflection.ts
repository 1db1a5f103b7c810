import {
  createFileRegistry,
  type DescFile,
  type DescService,
  type FileRegistry,
  toBinary,
} from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type ConnectRouter } from "@connectrpc/connect";
import * as v1 from "../../gen/grpc/reflection/v1/reflection_pb.js";
import * as v1alpha from "../../gen/grpc/reflection/v1alpha/reflection_pb.js";

// gRPC server reflection (grpc.reflection.v1 and the older v1alpha, which many tools
// still ask first), so buf curl, grpcurl and Postman call the API without a copy of
// the .proto files. connect-es v2 ships no implementation: this one answers from the
// descriptors that protoc-gen-es embeds in gen/, for exactly the services the router
// serves. It is a bidi stream, so it works over HTTP/2 (gRPC, or Connect over h2c).

/** gRPC status code NOT_FOUND, as reflection's ErrorResponse carries it. */
const NOT_FOUND = 5;

type Question =
  | v1.ServerReflectionRequest["messageRequest"]
  | v1alpha.ServerReflectionRequest["messageRequest"];

/** The reply, shaped like the oneof of both versions' ServerReflectionResponse. */
type Answer =
  | { case: "fileDescriptorResponse"; value: { fileDescriptorProto: Uint8Array[] } }
  | {
      case: "allExtensionNumbersResponse";
      value: { baseTypeName: string; extensionNumber: number[] };
    }
  | { case: "listServicesResponse"; value: { service: { name: string }[] } }
  | { case: "errorResponse"; value: { errorCode: number; errorMessage: string } };

/**
 * Registers both reflection services on the router. They describe every service the
 * router holds, read when the first reflection call arrives (so services registered
 * after this call are included, and so are the reflection services themselves).
 */
export function addReflection(router: ConnectRouter): void {
  let reflector: Reflector | undefined;
  const get = () => (reflector ??= new Reflector(uniqueServices(router)));
  // v1alpha is v1 under another package name (grpcurl and older clients still ask
  // for it): one conversation serves both.
  async function* converse<R extends v1.ServerReflectionRequest | v1alpha.ServerReflectionRequest>(
    requests: AsyncIterable<R>,
  ) {
    const session = get().session();
    for await (const req of requests) {
      yield {
        validHost: req.host,
        originalRequest: req,
        messageResponse: session.answer(req.messageRequest),
      };
    }
  }
  router.service(v1.ServerReflection, { serverReflectionInfo: converse });
  router.service(v1alpha.ServerReflection, { serverReflectionInfo: converse });
}

function uniqueServices(router: ConnectRouter): DescService[] {
  const byName = new Map<string, DescService>();
  for (const h of router.handlers) byName.set(h.service.typeName, h.service);
  return [...byName.values()];
}

/** Answers reflection questions about a fixed set of services. */
export class Reflector {
  readonly serviceNames: string[];
  private readonly registry: FileRegistry;
  private readonly encoded = new Map<string, Uint8Array>();

  constructor(services: DescService[]) {
    this.serviceNames = services.map((s) => s.typeName).sort();
    // Every file a service is declared in, with everything it imports.
    const files = new Map<string, DescFile>();
    const visit = (f: DescFile) => {
      if (files.has(f.proto.name)) return;
      files.set(f.proto.name, f);
      f.dependencies.forEach(visit);
    };
    for (const s of services) visit(s.file);
    this.registry = createFileRegistry(
      ...[...new Set(services.map((s) => s.file))].map((f) =>
        createFileRegistry(f.proto, (name) => files.get(name)),
      ),
    );
  }

  /**
   * One stream's view: a file already sent on this stream is not sent again as a
   * dependency (the protocol allows it, and clients keep what they received).
   */
  session(): { answer(q: Question): Answer } {
    const sent = new Set<string>();
    return { answer: (q) => this.answer(q, sent) };
  }

  private answer(q: Question, sent: Set<string>): Answer {
    switch (q.case) {
      case "listServices":
        return {
          case: "listServicesResponse",
          value: { service: this.serviceNames.map((name) => ({ name })) },
        };
      case "fileByFilename":
        return this.files(this.registry.getFile(q.value), `file ${q.value}`, sent);
      case "fileContainingSymbol":
        return this.files(this.fileOfSymbol(q.value), `symbol ${q.value}`, sent);
      case "fileContainingExtension": {
        const extendee = this.registry.getMessage(q.value.containingType);
        const ext = extendee && this.registry.getExtensionFor(extendee, q.value.extensionNumber);
        return this.files(
          ext?.file,
          `extension ${q.value.extensionNumber} of ${q.value.containingType}`,
          sent,
        );
      }
      case "allExtensionNumbersOfType": {
        const msg = this.registry.getMessage(q.value);
        if (msg === undefined) return notFound(`type ${q.value}`);
        const numbers: number[] = [];
        for (const t of this.registry)
          if (t.kind === "extension" && t.extendee.typeName === msg.typeName)
            numbers.push(t.number);
        return {
          case: "allExtensionNumbersResponse",
          value: { baseTypeName: msg.typeName, extensionNumber: numbers },
        };
      }
      default:
        throw new ConnectError("reflection request names no question", Code.InvalidArgument);
    }
  }

  /** The file first, then what it imports, transitively; imports already sent are left out. */
  private files(file: DescFile | undefined, what: string, sent: Set<string>): Answer {
    if (file === undefined) return notFound(what);
    const out: Uint8Array[] = [];
    const seen = new Set<string>();
    const walk = (f: DescFile, requested: boolean) => {
      const name = f.proto.name;
      if (seen.has(name) || (!requested && sent.has(name))) return;
      seen.add(name);
      sent.add(name);
      out.push(this.encode(f));
      for (const dep of f.dependencies) walk(dep, false);
    };
    walk(file, true);
    return { case: "fileDescriptorResponse", value: { fileDescriptorProto: out } };
  }

  /** A type, a service, or a member of one (method, field, oneof, enum value). */
  private fileOfSymbol(symbol: string): DescFile | undefined {
    const name = symbol.startsWith(".") ? symbol.slice(1) : symbol;
    const direct = this.registry.get(name);
    if (direct !== undefined) return direct.file;
    const dot = name.lastIndexOf(".");
    if (dot <= 0) return undefined;
    const parent = this.registry.get(name.slice(0, dot));
    const member = name.slice(dot + 1);
    switch (parent?.kind) {
      case "service":
        return parent.methods.some((m) => m.name === member) ? parent.file : undefined;
      case "message":
        return parent.fields.some((f) => f.name === member) ||
          parent.oneofs.some((o) => o.name === member)
          ? parent.file
          : undefined;
      case "enum":
        return parent.values.some((v) => v.name === member) ? parent.file : undefined;
      default:
        return undefined;
    }
  }

  private encode(f: DescFile): Uint8Array {
    let bytes = this.encoded.get(f.proto.name);
    if (bytes === undefined) {
      bytes = toBinary(FileDescriptorProtoSchema, f.proto);
      this.encoded.set(f.proto.name, bytes);
    }
    return bytes;
  }
}

function notFound(what: string): Answer {
  return {
    case: "errorResponse",
    value: { errorCode: NOT_FOUND, errorMessage: `${what} not found` },
  };
}
