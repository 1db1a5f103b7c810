// A progress bar screen readers announce: role, range, value and a sentence for the value.

export interface ProgressBarProps {
  /** The accessible name ("Overall progress", a file name). */
  label: string;
  /** 0 to 100; undefined while unknown (the bar is then indeterminate). */
  percent: number | undefined;
  /** What a screen reader says for the value, e.g. "42%, 21 MB of 50 MB". */
  valueText: string;
  small?: boolean;
}

export function ProgressBar({ label, percent, valueText, small = false }: ProgressBarProps) {
  return (
    <div
      className={small ? "bar bar-small" : "bar"}
      role="progressbar"
      aria-label={label}
      aria-valuemin={0}
      aria-valuemax={100}
      aria-valuenow={percent}
      aria-valuetext={valueText}
    >
      <div
        className={percent === undefined ? "bar-fill bar-indeterminate" : "bar-fill"}
        style={{ width: `${percent ?? 100}%` }}
      />
    </div>
  );
}
