//! Validation of a `ResiliencePolicy` beyond its schema: durations that parse, bounds that
//! hold together (a per-try timeout within the request timeout, a back-off base below its
//! cap), retry conditions and gRPC codes that exist. The controller and `weir` share it.

use super::*;

/// Whether `cond` is a known retry-on condition (a name or a status code 100–599).
pub fn retry_on_valid(cond: &str) -> bool {
    RETRY_ON.contains(&cond) || cond.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c))
}

impl ResiliencePolicySpec {
    /// Checks what the schema cannot.
    pub fn validate(&self) -> Result<(), FieldError> {
        dns_label("spec.targetRef.service", &self.target_ref.service)?;
        if let Some(rule) = &self.target_ref.rule
            && rule.is_empty()
        {
            return Err(FieldError::new("spec.targetRef.rule", "must not be empty"));
        }
        if let Some(p) = self.target_ref.port
            && !(1..=65535).contains(&p)
        {
            return Err(FieldError::new("spec.targetRef.port", format!("{p} is not a port")));
        }
        let mut request = None;
        if let Some(t) = &self.timeouts {
            if let Some(r) = &t.request {
                request = Some(positive_duration("spec.timeouts.request", r)?);
            }
            for (field, v) in [("connect", &t.connect), ("idle", &t.idle), ("streamIdle", &t.stream_idle)] {
                if let Some(v) = v {
                    positive_duration(&format!("spec.timeouts.{field}"), v)?;
                }
            }
            if let Some(p) = &t.per_try {
                let per_try = positive_duration("spec.timeouts.perTry", p)?;
                if request.is_some_and(|r| per_try > r) {
                    return Err(FieldError::new("spec.timeouts.perTry", "must not exceed spec.timeouts.request"));
                }
            }
        }
        if let Some(r) = &self.retries {
            if r.attempts > 10 {
                return Err(FieldError::new("spec.retries.attempts", "at most 10 retries"));
            }
            if r.retry_on.is_empty() {
                return Err(FieldError::new("spec.retries.retryOn", "at least one condition is required"));
            }
            for (i, c) in r.retry_on.iter().enumerate() {
                if !retry_on_valid(c) {
                    return Err(FieldError::new(
                        format!("spec.retries.retryOn[{i}]"),
                        format!("unknown condition {c:?} (expected one of {} or a status code)", RETRY_ON.join(", ")),
                    ));
                }
            }
            let base = positive_duration("spec.retries.backoff.base", &r.backoff.base)?;
            let max = positive_duration("spec.retries.backoff.max", &r.backoff.max)?;
            if max < base {
                return Err(FieldError::new("spec.retries.backoff.max", "must not be less than backoff.base"));
            }
            if r.budget.percent > 100 {
                return Err(FieldError::new("spec.retries.budget.percent", "must be between 0 and 100"));
            }
            positive_duration("spec.retries.budget.window", &r.budget.window)?;
        }
        if let Some(o) = &self.outlier_detection {
            let at = |f: &str| format!("spec.outlierDetection.{f}");
            if o.consecutive_failures == 0 {
                return Err(FieldError::new(at("consecutiveFailures"), "must be at least 1"));
            }
            if o.failure_rate_percent.is_some_and(|p| p == 0 || p > 100) {
                return Err(FieldError::new(at("failureRatePercent"), "must be between 1 and 100"));
            }
            if o.min_requests == 0 {
                return Err(FieldError::new(at("minRequests"), "must be at least 1"));
            }
            if o.max_ejected_percent > 100 {
                return Err(FieldError::new(at("maxEjectedPercent"), "must be between 0 and 100"));
            }
            positive_duration(&at("window"), &o.window)?;
            let base = positive_duration(&at("baseEjectionTime"), &o.base_ejection_time)?;
            if positive_duration(&at("maxEjectionTime"), &o.max_ejection_time)? < base {
                return Err(FieldError::new(at("maxEjectionTime"), "must not be less than baseEjectionTime"));
            }
        }
        if let Some(b) = &self.bulkhead {
            if b.max_in_flight == 0 {
                return Err(FieldError::new("spec.bulkhead.maxInFlight", "must be at least 1"));
            }
            if b.max_connections == Some(0) {
                return Err(FieldError::new("spec.bulkhead.maxConnections", "must be at least 1"));
            }
            positive_duration("spec.bulkhead.pendingTimeout", &b.pending_timeout)?;
        }
        if let Some(r) = &self.rate_limit {
            if r.requests_per_second == 0 {
                return Err(FieldError::new("spec.rateLimit.requestsPerSecond", "must be at least 1"));
            }
            if r.burst == Some(0) {
                return Err(FieldError::new("spec.rateLimit.burst", "must be at least 1"));
            }
            if r.max_keys == 0 {
                return Err(FieldError::new("spec.rateLimit.maxKeys", "must be at least 1"));
            }
            if let Some(w) = &r.window {
                if r.algorithm != RateLimitAlgorithm::SlidingWindow {
                    return Err(FieldError::new("spec.rateLimit.window", "only algorithm: SlidingWindow has a window"));
                }
                let window = positive_duration("spec.rateLimit.window", w)?;
                if window > std::time::Duration::from_secs(3600) {
                    return Err(FieldError::new("spec.rateLimit.window", "at most 1h"));
                }
                if f64::from(r.requests_per_second) * window.as_secs_f64() < 1.0 {
                    return Err(FieldError::new(
                        "spec.rateLimit.window",
                        format!(
                            "{w} at {} requests per second allows no request: requestsPerSecond × window must be at least 1",
                            r.requests_per_second
                        ),
                    ));
                }
            }
            if let Some(k) = &r.key {
                let identity = k.client_identity == Some(true);
                if identity && r.direction != Direction::Inbound {
                    return Err(FieldError::new(
                        "spec.rateLimit.key.clientIdentity",
                        "only inbound limits know the caller's identity: set direction: Inbound",
                    ));
                }
                match (&k.header, k.source_ip == Some(true), identity) {
                    (Some(h), false, false) if !h.is_empty() => http_header_name("spec.rateLimit.key.header", h)?,
                    (None, true, false) | (None, false, true) => {}
                    _ => {
                        return Err(FieldError::new(
                            "spec.rateLimit.key",
                            "set exactly one of header, sourceIp: true and clientIdentity: true",
                        ));
                    }
                }
            }
        }
        if let Some(f) = &self.faults {
            if let Some(d) = &f.delay {
                positive_duration("spec.faults.delay.fixed", &d.fixed)?;
                percent("spec.faults.delay.percent", d.percent)?;
            }
            if let Some(a) = &f.abort {
                percent("spec.faults.abort.percent", a.percent)?;
                match (a.http_status, &a.grpc_status) {
                    (Some(s), None) if (200..=599).contains(&s) => {}
                    (Some(_), None) => {
                        return Err(FieldError::new("spec.faults.abort.httpStatus", "must be between 200 and 599"));
                    }
                    (None, Some(g)) if grpc_code(g).is_some() => {}
                    (None, Some(g)) => {
                        return Err(FieldError::new(
                            "spec.faults.abort.grpcStatus",
                            format!("unknown gRPC code {g:?}"),
                        ));
                    }
                    _ => {
                        return Err(FieldError::new(
                            "spec.faults.abort",
                            "set exactly one of httpStatus and grpcStatus",
                        ));
                    }
                }
            }
            if f.delay.is_none() && f.abort.is_none() {
                return Err(FieldError::new("spec.faults", "set delay, abort or both"));
            }
            for (i, h) in f.headers.iter().enumerate() {
                http_header_name(&format!("spec.faults.headers[{i}].name"), &h.name)?;
                if h.kind == crate::route::ValueMatchType::RegularExpression {
                    crate::route::compile_regex(&h.value).map_err(|e| {
                        FieldError::new(
                            format!("spec.faults.headers[{i}].value"),
                            format!("invalid regular expression: {e}"),
                        )
                    })?;
                }
            }
        }
        if let Some(h) = &self.health_check {
            if !h.path.starts_with('/') {
                return Err(FieldError::new("spec.healthCheck.path", "must start with '/'"));
            }
            if h.path.parse::<http::uri::PathAndQuery>().is_err() {
                return Err(FieldError::new("spec.healthCheck.path", "not a valid path"));
            }
            positive_duration("spec.healthCheck.interval", &h.interval)?;
            positive_duration("spec.healthCheck.timeout", &h.timeout)?;
            if h.healthy_threshold == 0 {
                return Err(FieldError::new("spec.healthCheck.healthyThreshold", "must be at least 1"));
            }
            if h.unhealthy_threshold == 0 {
                return Err(FieldError::new("spec.healthCheck.unhealthyThreshold", "must be at least 1"));
            }
        }
        if let Some(lb) = &self.load_balancer {
            let hashing = matches!(lb.algorithm, LbAlgorithm::RingHash | LbAlgorithm::Maglev);
            match (&lb.hash_key, hashing) {
                (None, true) => {
                    return Err(FieldError::new("spec.loadBalancer.hashKey", "required for RingHash and Maglev"));
                }
                (Some(_), false) => {
                    return Err(FieldError::new(
                        "spec.loadBalancer.hashKey",
                        "only RingHash and Maglev use a hash key",
                    ));
                }
                (Some(k), true) => {
                    let set = [k.header.is_some(), k.cookie.is_some(), k.source_ip == Some(true)];
                    if set.iter().filter(|s| **s).count() != 1 {
                        return Err(FieldError::new(
                            "spec.loadBalancer.hashKey",
                            "set exactly one of header, cookie and sourceIp: true",
                        ));
                    }
                    if let Some(h) = &k.header {
                        http_header_name("spec.loadBalancer.hashKey.header", h)?;
                    }
                    if k.cookie.as_deref() == Some("") {
                        return Err(FieldError::new("spec.loadBalancer.hashKey.cookie", "must not be empty"));
                    }
                }
                (None, false) => {}
            }
        }
        if let Some(cb) = &self.circuit_breaker {
            if cb.consecutive_failures == 0 {
                return Err(FieldError::new("spec.circuitBreaker.consecutiveFailures", "must be at least 1"));
            }
            let open = positive_duration("spec.circuitBreaker.openDuration", &cb.open_duration)?;
            let max = positive_duration("spec.circuitBreaker.maxOpenDuration", &cb.max_open_duration)?;
            if max < open {
                return Err(FieldError::new(
                    "spec.circuitBreaker.maxOpenDuration",
                    "must not be less than openDuration",
                ));
            }
            if cb.half_open_requests == 0 {
                return Err(FieldError::new("spec.circuitBreaker.halfOpenRequests", "must be at least 1"));
            }
            if cb.success_threshold == 0 {
                return Err(FieldError::new("spec.circuitBreaker.successThreshold", "must be at least 1"));
            }
        }
        Ok(())
    }
}
