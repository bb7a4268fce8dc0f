//! UTC calendar arithmetic, in Rust rather than in SQL: MariaDB's
//! `FROM_UNIXTIME` and `UNIX_TIMESTAMP` stop at 2038-01-19 (a 32-bit
//! `TIMESTAMP`), while the contract accepts event times up to 2100. The
//! read model's `DATETIME(3)` columns hold UTC civil times (every session
//! runs at `time_zone = '+00:00'`), written and read through these
//! functions, so any time from 1970 to 9999 round-trips exactly.

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date `(year, month, day)` of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `YYYY-MM-DD HH:MM:SS.mmm`, the UTC time of Unix milliseconds `ms`, as
/// MariaDB takes a `DATETIME(3)`.
pub fn datetime_utc(ms: i64) -> String {
    let (days, in_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let (secs, millis) = (in_day / 1000, in_day % 1000);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{millis:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Unix milliseconds of a UTC `YYYY-MM-DD HH:MM:SS[.fff]` (a `DATETIME`
/// as MariaDB prints it); `None` when it is not one. Allocates nothing:
/// every id row a batch loads has two.
pub fn parse_datetime_utc(raw: &str) -> Option<i64> {
    let (date, time) = raw.trim().split_once([' ', 'T'])?;
    let (time, fraction) = time.split_once('.').unwrap_or((time, ""));
    let d = three_numbers(date, '-')?;
    let t = three_numbers(time, ':')?;
    if !(1..=12).contains(&d[1]) || !(1..=31).contains(&d[2]) || t[0] > 23 || t[1] > 59 || t[2] > 60
    {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // The first three digits, padded with zeros: ".5" is 500 ms.
    let millis = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0, |ms, b| ms * 10 + i64::from(b - b'0'));
    let days = days_from_civil(d[0], d[1], d[2]);
    Some(((days * 24 + t[0]) * 60 + t[1]) * 60_000 + t[2] * 1000 + millis)
}

/// `a<sep>b<sep>c` as three integers.
fn three_numbers(s: &str, sep: char) -> Option<[i64; 3]> {
    let mut parts = s.split(sep);
    let mut numbers = [0; 3];
    for n in &mut numbers {
        *n = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(numbers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_past_2038_round_trip() {
        for (ms, text) in [
            (0, "1970-01-01 00:00:00.000"),
            (1_764_300_000_123, "2025-11-28 03:20:00.123"),
            (2_147_483_648_000, "2038-01-19 03:14:08.000"),
            (2_177_452_800_000, "2039-01-01 00:00:00.000"),
            (4_102_444_799_999, "2099-12-31 23:59:59.999"),
            (4_102_444_800_000, "2100-01-01 00:00:00.000"),
        ] {
            assert_eq!(datetime_utc(ms), text);
            assert_eq!(parse_datetime_utc(text), Some(ms), "{text}");
        }
        assert_eq!(
            parse_datetime_utc("2039-01-01 00:00:00"),
            Some(2_177_452_800_000)
        );
        assert_eq!(parse_datetime_utc("2039-13-01 00:00:00"), None);
        assert_eq!(parse_datetime_utc("not a time"), None);
    }

    #[test]
    fn fractions_are_read_to_the_millisecond_and_shapes_are_checked() {
        let base = 2_177_452_800_000;
        assert_eq!(
            parse_datetime_utc("2039-01-01 00:00:00.5"),
            Some(base + 500)
        );
        assert_eq!(
            parse_datetime_utc("2039-01-01T00:00:00.123456"),
            Some(base + 123)
        );
        assert_eq!(
            parse_datetime_utc("2039-01-01 00:00:00.07"),
            Some(base + 70)
        );
        for bad in [
            "2039-01-01 00:00:00.x",
            "2039-01-01 00:00",
            "2039-01-01 00:00:00:00",
            "2039-01 00:00:00",
            "2039-01-01-01 00:00:00",
        ] {
            assert_eq!(parse_datetime_utc(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_day_of_four_centuries_converts_both_ways() {
        for days in (-1000..200_000).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
