// The server's public routes, as any client calls them: JSON in, JSON out, errors as ApiError naming the field.

export class ApiError extends Error {
  constructor(message, status = 0, field = null) {
    super(message);
    this.status = status;
    this.field = field; // the request field the server names ("steps", "override_settings.sd_model_checkpoint")
  }
}

// AUTOMATIC1111-shaped error bodies: {"error", "detail", "field"?}; 422 validation errors: detail "field.path: msg".
export function errorOf(status, body, fallback) {
  let message = fallback;
  let field = null;
  if (body && typeof body === "object") {
    const detail = body.detail ?? body.errors ?? body.error;
    if (typeof detail === "string") message = detail;
    else if (Array.isArray(detail) && detail.length) message = detail.map((d) => d.msg || String(d)).join("; ");
    else if (detail && typeof detail === "object" && detail.message) message = detail.message;
    if (typeof body.field === "string" && body.field) field = body.field;
  }
  if (!field) {
    const named = /^([A-Za-z_][\w.\[\]]*):\s/.exec(message);
    if (named) field = named[1];
  }
  return new ApiError(message, status, field);
}

export async function call(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(`the server cannot be reached (${e.message})`, 0);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) throw errorOf(response.status, data, `${response.status} ${response.statusText || "error"}`);
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body ?? {});
