import { type FormEvent, useState } from "react";

export interface TokenFormProps {
  /** The token in use ("" for none). */
  token: string;
  onApply(token: string): void;
}

/** The bearer token sent with every call, for servers that require one. */
export function TokenForm({ token, onApply }: TokenFormProps) {
  const [draft, setDraft] = useState(token);
  const submit = (e: FormEvent) => {
    e.preventDefault();
    onApply(draft.trim());
  };
  return (
    <form className="token-form" onSubmit={submit}>
      <label htmlFor="access-token">Access token</label>
      <input
        id="access-token"
        type="password"
        autoComplete="off"
        spellCheck={false}
        value={draft}
        placeholder="only if the service asks for one"
        onChange={(e) => setDraft(e.currentTarget.value)}
      />
      <button type="submit">Use token</button>
      {token !== "" && (
        <button
          type="button"
          className="link"
          onClick={() => {
            setDraft("");
            onApply("");
          }}
        >
          Forget token
        </button>
      )}
    </form>
  );
}
