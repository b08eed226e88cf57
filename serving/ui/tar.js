// A folder the user drops or picks becomes one upload archive (ustar, gzip where the browser has
// CompressionStream): the same layout `mergeserve ingest FOLDER` packs, so the server reads it the same way.

const enc = new TextEncoder();
const BLOCK = 512;

export const ARCHIVE_SUFFIXES = [".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"];

export function isArchive(name) {
  const n = name.toLowerCase();
  return ARCHIVE_SUFFIXES.some((s) => n.endsWith(s));
}

/** Hidden files and folders (".DS_Store", ".git/…") are left out, as the CLI leaves them out. */
export function visible(path) {
  return path.split("/").every((p) => p && !p.startsWith("."));
}

function put(header, offset, length, text) {
  const bytes = enc.encode(text);
  if (bytes.length > length) throw new Error(`tar field too long: ${text}`);
  header.set(bytes, offset);
}

function octal(n, length) {
  return n.toString(8).padStart(length - 1, "0");
}

// ustar keeps 100 bytes of name and 155 of prefix: a longer path is split at a "/".
function splitName(path) {
  if (enc.encode(path).length <= 100) return ["", path];
  for (let i = path.indexOf("/"); i > 0; i = path.indexOf("/", i + 1)) {
    const prefix = path.slice(0, i), name = path.slice(i + 1);
    if (enc.encode(prefix).length <= 155 && enc.encode(name).length <= 100) return [prefix, name];
  }
  throw new Error(`path too long for a tar archive: ${path}`);
}

/** A ustar header block for a regular file of `size` bytes. */
export function header(path, size, mtime) {
  const b = new Uint8Array(BLOCK);
  const [prefix, name] = splitName(path);
  put(b, 0, 100, name);
  put(b, 100, 8, "0000644");
  put(b, 108, 8, "0000000");
  put(b, 116, 8, "0000000");
  put(b, 124, 12, octal(size, 12));
  put(b, 136, 12, octal(Math.floor(mtime), 12));
  b.fill(0x20, 148, 156); // the checksum is computed with its own field as spaces
  b[156] = 0x30; // "0": regular file
  put(b, 257, 6, "ustar");
  put(b, 263, 2, "00");
  put(b, 345, 155, prefix);
  const sum = b.reduce((a, x) => a + x, 0);
  put(b, 148, 8, `${octal(sum, 7)}\0`);
  return b;
}

/** `[{path, file}]` → one tar as a Blob (contents are referenced, not copied, until the upload reads them). */
export function tarBlob(entries) {
  const parts = [];
  for (const { path, file } of entries) {
    parts.push(header(path, file.size, (file.lastModified || Date.now()) / 1000), file);
    const pad = (BLOCK - (file.size % BLOCK)) % BLOCK;
    if (pad) parts.push(new Uint8Array(pad));
  }
  parts.push(new Uint8Array(2 * BLOCK)); // end of archive
  return new Blob(parts, { type: "application/x-tar" });
}

/** gzip a blob when the browser can (an image folder shrinks little, tar's padding a lot); else as is. */
export async function gzip(blob) {
  if (typeof CompressionStream === "undefined") return { blob, name: "folder.tar" };
  const stream = blob.stream().pipeThrough(new CompressionStream("gzip"));
  return { blob: await new Response(stream).blob(), name: "folder.tar.gz" };
}
