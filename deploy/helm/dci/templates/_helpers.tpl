{{- /* The scheme of every node's gRPC URL. */}}
{{- define "dci.scheme" -}}
{{ if .Values.tls.secret }}https{{ else }}http{{ end }}
{{- end }}

{{- /* A component's values.extraArgs: flags besides those the chart sets. A whole number
stays digits (values' numbers are floats to the template engine: 6.7108864e+07 otherwise). */}}
{{- define "dci.extraArgs" -}}
{{- range . }}, {{ if and (kindIs "float64" .) (eq . (float64 (int64 .))) }}{{ int64 . | toString | quote }}{{ else }}{{ toString . | quote }}{{ end }}{{ end }}
{{- end }}

{{- /* A node's TLS flags (after its other args, each preceded by a comma), from the Secret's
files mounted at /tls. */}}
{{- define "dci.tlsArgs" -}}
{{- if .Values.tls.secret -}}
, "--tls-cert", "/tls/tls.crt", "--tls-key", "/tls/tls.key", "--tls-ca", "/tls/ca.crt"
{{- if .Values.tls.mutual }}, "--tls-client-ca", "/tls/ca.crt"
{{- range $api, $names := .Values.tls.allow }}{{ if $names }}, "--tls-allow-{{ $api }}", {{ join "," $names | quote }}{{ end }}{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{- /* The metrics port's flag: /metrics, and /healthz and /readyz for the probes, plain HTTP even when gRPC
is TLS (Kubernetes' gRPC probes cannot speak TLS). */}}
{{- define "dci.metricsArgs" -}}
"--metrics-listen", "0.0.0.0:{{ .Values.metricsPort }}"
{{- end }}

{{- /* A size in bytes for a flag: a string with a unit ("256MiB") as it is; a number through int64,
since a large number from values is a float to the template engine, and would be printed as
2.68435456e+08. */}}
{{- define "dci.size" -}}
{{ if kindIs "string" . }}{{ . }}{{ else }}{{ . | int64 }}{{ end }}
{{- end }}

{{- define "dci.probe" -}}
httpGet: {path: /healthz, port: metrics}
{{- end }}

{{- /* Liveness: a node that has not answered /healthz for half a minute (its runtime wedged, or a
coordinator whose log failed, which only a restart recovers) is restarted. Slow answers under load
are not failures: five seconds each, three in a row. */}}
{{- define "dci.liveProbe" -}}
{{ include "dci.probe" . }}
periodSeconds: 10
timeoutSeconds: 5
failureThreshold: 3
{{- end }}

{{- /* A relay's or edge's readiness: caught up with its coordinator lately (a relay within three
peer timeouts, an edge within its staleness bound). Asked often, so that a relay cut off from the
coordinators leaves its Service (new edges connect to one that is not) within seconds. */}}
{{- define "dci.readyProbe" -}}
httpGet: {path: /readyz, port: metrics}
periodSeconds: 2
failureThreshold: 2
{{- end }}

{{- /* Prometheus' conventional scrape annotations. */}}
{{- define "dci.podAnnotations" -}}
annotations: {prometheus.io/scrape: "true", prometheus.io/port: "{{ .Values.metricsPort }}", prometheus.io/path: /metrics}
{{- end }}

{{- /* Where a component's pods go (ctx: .v, the component's values; .labels, its pods' labels):
its nodeSelector and tolerations, and its affinity; with none given, a preference (not a rule)
for nodes that hold none of the same pods yet, so that losing a node loses one of them. */}}
{{- define "dci.placement" -}}
{{- with .v.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .v.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .v.affinity }}
affinity: {{- toYaml .v.affinity | nindent 2 }}
{{- else if .labels }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector: {matchLabels: {{ toJson .labels }}}
{{- end }}
{{- end }}

{{- /* A disruption budget for a region's relays or edges (ctx: .name, .v the component's
values, .labels its pods' labels): a node drain or a cluster upgrade evicts at most
`maxUnavailable` of them at a time. */}}
{{- define "dci.disruptionBudget" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
spec:
  maxUnavailable: {{ .v.maxUnavailable }}
  selector:
    matchLabels: {{ toJson .labels }}
{{- end }}
