// Errors beside the fields they name: each message element lists, in data-error-for, the request fields it
// speaks for ("steps", "override_settings.sd_model_checkpoint"); its input points at it with aria-describedby.

import { ApiError } from "./api.js";

const $ = (id) => document.getElementById(id);

export function errorElementFor(field) {
  if (!field) return null;
  const f = String(field);
  const candidates = [f, f.replace(/\[\d+\]|\.\d+/g, ""), f.split(".").pop(), f.split(".")[0]];
  for (const name of candidates) {
    const el = document.querySelector(`[data-error-for~="${CSS.escape(name)}"]`);
    if (el) return el;
  }
  return null;
}

function inputOf(errorEl) {
  return document.querySelector(`[aria-describedby~="${CSS.escape(errorEl.id)}"]`);
}

export function clearErrors() {
  for (const el of document.querySelectorAll(".error")) {
    el.hidden = true;
    el.textContent = "";
  }
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

export function clearError(input) {
  input.removeAttribute("aria-invalid");
  for (const id of (input.getAttribute("aria-describedby") || "").split(/\s+/)) {
    const el = id && $(id);
    if (el && el.classList.contains("error")) {
      el.hidden = true;
      el.textContent = "";
    }
  }
}

// The message beside the field it names (the server's words), else in `fallbackId`; the field marked invalid.
export function showError(err, fallbackId = "general-error") {
  const message = err instanceof Error ? err.message : String(err);
  const field = err instanceof ApiError || err?.field ? err.field : null;
  const target = errorElementFor(field) || $(fallbackId);
  target.textContent = message;
  target.hidden = false;
  const input = target.id === "general-error" ? null : inputOf(target);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    if (!input.closest("[hidden]")) input.focus({ preventScroll: false });
  }
  target.scrollIntoView?.({ block: "nearest" });
}
