// SPDX-License-Identifier: LGPL-2.1-or-later
// See console.hpp.
#include "console.hpp"

#include <QBrush>
#include <QColor>
#include <QJsonDocument>
#include <QLocale>
#include <QNetworkReply>
#include <QNetworkRequest>
#include <cmath>

namespace otpgate::console {

QString human_bytes(double bytes) {
  return QLocale().formattedDataSize(qint64(bytes), 1, QLocale::DataSizeSIFormat);  // "3.3 MB"
}

RateUnit rate_unit(double bits_per_s) {
  static const RateUnit units[] = {{1e9, "Gbit/s"}, {1e6, "Mbit/s"}, {1e3, "kbit/s"}, {1, "bit/s"}};
  for (const auto& u : units)
    if (std::abs(bits_per_s) >= u.divisor) return u;
  return units[3];
}

QString human_rate(double bits_per_s, std::optional<RateUnit> unit) {
  const RateUnit u = unit.value_or(rate_unit(bits_per_s));
  const double v = bits_per_s / u.divisor;
  // Three significant digits at most: "1.31 Mbit/s", "12.5 kbit/s", "250 kbit/s".
  const int decimals = v == 0 || std::abs(v) >= 100 ? 0 : std::abs(v) >= 10 ? 1 : 2;
  QString number = QLocale().toString(v, 'f', decimals);
  if (decimals > 0) {  // no trailing zeros: "2.5", "2"
    const QChar point = QLocale().decimalPoint().at(0);
    while (number.endsWith('0')) number.chop(1);
    if (number.endsWith(point)) number.chop(1);
  }
  return number + " " + u.name;
}

QString human_duration(double seconds) {
  const QLocale l;
  if (seconds < 90) return l.toString(qRound(seconds)) + " s";
  const qint64 minutes = qRound64(seconds / 60);
  if (minutes < 120) return l.toString(minutes) + " min";
  if (minutes < 48 * 60)
    return l.toString(minutes / 60) + " h " + l.toString(minutes % 60) + " min";
  return l.toString(minutes / (24 * 60)) + " d " + l.toString(minutes / 60 % 24) + " h";
}

double tick_step(double top, int max_ticks) {
  if (top <= 0 || max_ticks < 1) return 1;
  const double raw = top / max_ticks;
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * magnitude >= raw) return m * magnitude;
  return 10 * magnitude;
}

// ---------------------------------------------------------------------------
// ServicePoller

ServicePoller::ServicePoller(Kind kind, QUrl base, QObject* parent)
    : QObject(parent), kind_(kind), base_(std::move(base)) {
  connect(&network_, &QNetworkAccessManager::finished, this, &ServicePoller::finished);
  connect(&timer_, &QTimer::timeout, this, &ServicePoller::poll_now);
}

void ServicePoller::start(int interval_ms) {
  timer_.start(interval_ms);
  poll_now();
}

QNetworkRequest service_request(int kind, const QUrl& base, const QString& user,
                                const QString& password, const QString& path) {
  QUrl url = base;
  url.setPath(!path.isEmpty()                             ? path
              : kind == int(ServicePoller::Kind::gateway) ? "/api/v1/status"
                                                          : "/api/v1/jobs");
  QNetworkRequest request(url);
  if (!user.isEmpty()) {
    request.setRawHeader("Authorization", "Basic " + (user + ":" + password).toUtf8().toBase64());
  }
  return request;
}

QNetworkRequest ServicePoller::request(const QString& path) const {
  return service_request(int(kind_), base_, user_, password_, path);
}

void ServicePoller::poll_now() {
  if (in_flight_) return;  // a slow service gets one request at a time
  QNetworkRequest request = this->request({});
  request.setTransferTimeout(2000);
  request.setAttribute(QNetworkRequest::User, QStringLiteral("poll"));
  in_flight_ = true;
  network_.get(request);
}

void ServicePoller::finished(QNetworkReply* reply) {
  reply->deleteLater();
  if (reply->request().attribute(QNetworkRequest::User).toString() != "poll") return;
  in_flight_ = false;
  if (reply->error() != QNetworkReply::NoError) {
    set_up(false, reply->errorString());
    return;
  }
  QJsonParseError error{};
  const QJsonDocument doc = QJsonDocument::fromJson(reply->readAll(), &error);
  if (error.error != QJsonParseError::NoError || !doc.isObject()) {
    set_up(false, "the service answered something that is not a JSON object");
    return;
  }
  set_up(true, {});
  emit updated(doc.object());
}

void ServicePoller::set_up(bool up, const QString& error) {
  last_error_ = error;
  if (seen_ && up == up_) return;
  seen_ = true;
  up_ = up;
  emit availability_changed(up, error);
}

void ServicePoller::action_finished(QNetworkReply* reply,
                                    const std::function<void(int, QString)>& done) {
  reply->deleteLater();
  const int status = reply->attribute(QNetworkRequest::HttpStatusCodeAttribute).toInt();
  const QJsonObject body = QJsonDocument::fromJson(reply->readAll()).object();
  QString message = body.value("error").toString();
  if (status == 0) message = reply->errorString();
  if (done) done(status, message);
  poll_now();  // show the effect at once
}

void ServicePoller::post(const QString& path, const QJsonObject& body,
                         std::function<void(int, QString)> done) {
  QNetworkRequest request = this->request(path);
  request.setHeader(QNetworkRequest::ContentTypeHeader, "application/json");
  request.setTransferTimeout(5000);
  QNetworkReply* reply = network_.post(request, QJsonDocument(body).toJson(QJsonDocument::Compact));
  connect(reply, &QNetworkReply::finished, this,
          [this, reply, done] { action_finished(reply, done); });
}

void ServicePoller::remove(const QString& path, std::function<void(int, QString)> done) {
  QNetworkRequest request = this->request(path);
  request.setTransferTimeout(5000);
  QNetworkReply* reply = network_.deleteResource(request);
  connect(reply, &QNetworkReply::finished, this,
          [this, reply, done] { action_finished(reply, done); });
}

// ---------------------------------------------------------------------------
// Models

namespace {

QVariant header(const QStringList& names, int section, Qt::Orientation o, int role) {
  if (role != Qt::DisplayRole || o != Qt::Horizontal || section >= names.size()) return {};
  return names[section];
}

QString local_time(qint64 ms) {
  if (ms <= 0) return "-";
  return QDateTime::fromMSecsSinceEpoch(ms).toString("yyyy-MM-dd HH:mm");
}

}  // namespace

std::optional<KeySupplyRow> KeySupplyModel::make_row(const QString& site_name,
                                                     const QJsonObject& stream_object,
                                                     const char* dir) const {
  const QJsonObject k = stream_object.value("key_supply").toObject().value(dir).toObject();
  if (k.isEmpty()) return std::nullopt;
  const QJsonObject element = stream_object.value(dir).toObject();
  Row r;
  r.site = site_name;
  r.stream = stream_object.value("name").toString();
  r.direction = dir;
  r.ready_bytes = k.value("bytes_available").toDouble();
  r.seconds_left =
      k.value("seconds_to_exhaustion").isNull() ? -1 : k.value("seconds_to_exhaustion").toDouble();
  r.consumption_bps = k.value("consumption_bits_per_s").toDouble();
  r.fetched_bytes = k.value("bytes_fetched").toDouble();
  r.capacity_bytes = k.value("ring_capacity_bytes").toDouble();
  r.kme_healthy = k.value("kme_healthy").toBool(true);
  r.kme_error = k.value("kme_last_error").toString();
  r.mode = element.value("aes-fallback").toBool()                ? "AES fallback"
           : element.value("cipher").toString() == "aes-256-gcm" ? "AES"
                                                                 : "OTP";
  return r;
}

QVariant KeySupplyModel::data(const QModelIndex& index, int role) const {
  if (!index.isValid()) return {};
  const Row& r = rows_.at(std::size_t(index.row()));
  if (role == Qt::UserRole + 1 && index.column() == ready) {  // the gauge's fill, 0..1
    return r.capacity_bytes > 0 ? QVariant(std::min(1.0, r.ready_bytes / r.capacity_bytes))
                                : QVariant();
  }
  if (role == Qt::UserRole) {  // raw numbers for tests and charts
    switch (index.column()) {
      case ready:
        return r.ready_bytes;
      case seconds_left:
        return r.seconds_left;
      case consumption:
        return r.consumption_bps;
      default:
        break;
    }
  }
  if (role == Qt::BackgroundRole) {
    // A stream's own ring refills at half: a few seconds left is normal while the link
    // has key (the link's forecast, not this, says whether key runs short).
    if (!r.kme_healthy) return QBrush(QColor(255, 205, 205));
    if (r.mode != "OTP") return QBrush(QColor(255, 236, 179));
    return {};
  }
  if (role != Qt::DisplayRole) return {};
  if (index.column() <= direction) return key_cell(r, index.column());
  switch (index.column()) {
    case ready:
      return human_bytes(r.ready_bytes);
    case seconds_left:
      return r.seconds_left < 0 ? QString("idle") : human_duration(r.seconds_left);
    case consumption:
      return human_rate(r.consumption_bps);
    case kme:
      return r.kme_healthy ? "healthy" : "unreachable";
    case last_error:
      return r.kme_error;
    case mode:
      return r.mode;
    default:
      return {};
  }
}

QVariant KeySupplyModel::headerData(int section, Qt::Orientation o, int role) const {
  static const QStringList names{"Site",       "Stream",         "Direction",
                                 "Ring ready", "Ring time left", "Consumption",
                                 "KME",        "Last KME error", "Mode"};
  return header(names, section, o, role);
}

QString lasts_text(const LinkRow& r) {
  if (r.seconds_left < 0) {
    return r.consumption_bps > 0 ? QString("refill keeps up: the key does not run out")
                                 : QString("no key in use now");
  }
  return "at the current rate the key lasts " + human_duration(r.seconds_left);
}

QString panel_text(const LinkRow& r) {
  if (r.panel_seconds <= 0 || r.consumption_bps <= 0) return "no media on this link now";
  const QString head =
      QString("a %1-minute panel needs %2: ")
          .arg(QLocale().toString(qRound(r.panel_seconds / 60)), human_bytes(r.panel_needed));
  return head + (r.panel_covered ? QString("covered") : "short by " + human_bytes(r.panel_short));
}

std::vector<LinkRow> LinkModel::rows_of(const QString& site_name, const QJsonObject& status) const {
  std::vector<LinkRow> rows;
  for (const auto& value : status.value("links").toArray()) {
    const QJsonObject l = value.toObject();
    const QJsonObject panel_object = l.value("panel").toObject();
    LinkRow r;
    r.site = site_name;
    r.stream = l.value("peer_sae_id").toString();
    r.direction = l.value("direction").toString();
    r.streams = l.value("streams").toInt();
    r.aes_streams = l.value("aes_fallback_streams").toInt();
    r.held_bytes = l.value("held_bytes").toDouble();
    r.ring_bytes = l.value("ring_bytes").toDouble();
    r.kme_bytes = l.value("kme_bytes").toDouble();
    r.kme_trusted = l.value("kme_trusted").toBool();
    r.kme_note = l.value("kme_note").toString();
    r.refill_bps = l.value("refill_bits_per_s").toDouble();
    r.consumption_bps = l.value("consumption_bits_per_s").toDouble();
    r.seconds_left = l.value("seconds_left").isDouble() ? l.value("seconds_left").toDouble() : -1;
    r.panel_seconds = panel_object.value("seconds").toDouble();
    r.panel_needed = panel_object.value("needed_bytes").toDouble();
    r.panel_short = panel_object.value("short_bytes").toDouble();
    r.panel_covered = panel_object.value("covered").toBool(true);
    r.kme_healthy = l.value("kme_healthy").toBool(true);
    r.kme_error = l.value("kme_last_error").toString();
    rows.push_back(std::move(r));
  }
  return rows;
}

QVariant LinkModel::data(const QModelIndex& index, int role) const {
  if (!index.isValid()) return {};
  const Row& r = rows_.at(std::size_t(index.row()));
  const bool sending = r.direction == "send";
  if (role == Qt::BackgroundRole) {
    const bool short_of_key = sending && ((index.column() == lasts && r.seconds_left >= 0) ||
                                          (index.column() == panel && !r.panel_covered));
    if (short_of_key || (index.column() == kme && !r.kme_healthy))
      return QBrush(QColor(255, 205, 205));
    if (index.column() == mode && r.aes_streams > 0) return QBrush(QColor(255, 236, 179));
    return {};
  }
  if (role == Qt::ToolTipRole) {
    if (index.column() == held) {
      return QString("rings %1, KME %2%3")
          .arg(human_bytes(r.ring_bytes), human_bytes(r.kme_bytes),
               r.kme_note.isEmpty() ? QString() : " (" + r.kme_note + ")");
    }
    if (index.column() == kme) return r.kme_error;
    return {};
  }
  if (role == Qt::UserRole) {  // raw numbers for tests and charts
    switch (index.column()) {
      case held:
        return r.held_bytes;
      case refill:
        return r.refill_bps;
      case consumption:
        return r.consumption_bps;
      case lasts:
        return r.seconds_left;
      default:
        return {};
    }
  }
  if (role != Qt::DisplayRole) return {};
  switch (index.column()) {
    case site:
      return r.site;
    case peer:
      return r.stream;
    case direction:
      return r.direction;
    case held:
      // A receiving (slave) link fetches each key when its announcement arrives and holds
      // none ahead: "0 B" there would read as a shortage.
      if (!sending && r.held_bytes == 0) return QString("fetched as announced");
      return human_bytes(r.held_bytes) + (r.kme_note.isEmpty() ? "" : " (rings only)");
    case refill:
      return human_rate(r.refill_bps);
    case consumption:
      return human_rate(r.consumption_bps);
    case lasts:
      return sending ? lasts_text(r) : QString("the sender's key decides");
    case panel:
      return sending ? panel_text(r) : QString("-");
    case kme:
      return r.kme_healthy ? QString("healthy") : "unhealthy: " + r.kme_error;
    case mode:
      return r.aes_streams > 0
                 ? QString("AES fallback on %1 of %2 streams").arg(r.aes_streams).arg(r.streams)
                 : QString("OTP, %1 streams").arg(r.streams);
    default:
      return {};
  }
}

QVariant LinkModel::headerData(int section, Qt::Orientation o, int role) const {
  static const QStringList names{"Site",        "Peer",     "Direction", "Key held", "Refill",
                                 "Consumption", "Forecast", "Panel",     "KME",      "Mode"};
  return header(names, section, o, role);
}

std::optional<StreamRow> StreamModel::make_row(const QString& site_name, const QJsonObject& o,
                                               const char* dir) const {
  const QJsonObject e = o.value(dir).toObject();
  if (e.isEmpty()) return std::nullopt;
  auto n = [&](const char* field) { return qulonglong(e.value(field).toDouble()); };
  Row r;
  r.site = site_name;
  r.stream = o.value("name").toString();
  r.direction = dir;
  r.packets = n("packets-out");
  r.bytes = n("bytes-out");
  r.auth_failures = n("auth-failures");
  r.replays = n("replays");
  r.drops = n("drops-no-key") + n("drops-malformed") + n("drops-cipher");
  return r;
}

QVariant StreamModel::data(const QModelIndex& index, int role) const {
  if (!index.isValid()) return {};
  const Row& r = rows_.at(std::size_t(index.row()));
  const qulonglong values[] = {0, 0, 0, r.packets, r.bytes, r.auth_failures, r.replays, r.drops};
  if (role == Qt::BackgroundRole) {
    return index.column() >= auth_failures && values[index.column()] != 0
               ? QVariant(QBrush(QColor(255, 205, 205)))
               : QVariant();
  }
  if (role == Qt::UserRole && index.column() >= packets) return values[index.column()];
  if (role != Qt::DisplayRole) return {};
  if (index.column() <= direction) return key_cell(r, index.column());
  switch (index.column()) {
    case bytes:
      return human_bytes(double(r.bytes));
    default:
      return values[index.column()];
  }
}

QVariant StreamModel::headerData(int section, Qt::Orientation o, int role) const {
  static const QStringList names{"Site",  "Stream",        "Direction", "Packets",
                                 "Bytes", "Auth failures", "Replays",   "Drops"};
  return header(names, section, o, role);
}

std::vector<CallRow> CallModel::rows_of(const QString& site_name, const QJsonObject& status) const {
  std::vector<CallRow> rows;
  for (const auto& call_value : status.value("calls").toArray()) {
    const QJsonObject c = call_value.toObject();
    for (const auto& media_value : c.value("media").toArray()) {
      const QJsonObject m = media_value.toObject();
      const QJsonObject packets = m.value("packets").toObject();
      const QJsonObject key = m.value("key_used_bytes").toObject();
      auto n = [](const QJsonObject& o, const char* field) {
        return qulonglong(o.value(field).toDouble());
      };
      const QJsonValue receive_lane = m.value("receive_lane");
      Row r;
      r.site = site_name;
      r.stream = c.value("call_id").toString();
      r.direction = QString("%1 %2").arg(m.value("index").toInt()).arg(m.value("type").toString());
      r.state = c.value("state").toString();
      r.endpoint = m.value("endpoint").isString() ? m.value("endpoint").toString() : "-";
      r.lanes =
          QString("%1 / %2")
              .arg(m.value("send_lane").toInt())
              .arg(receive_lane.isDouble() ? QString::number(receive_lane.toInt()) : QString("-"));
      r.cipher = m.value("cipher").toString("otp").toUpper();
      r.cap_bits_per_s = m.value("cap_bits_per_s").toDouble();
      r.packets_sent = n(packets, "to_peer");
      r.packets_received = n(packets, "to_local");
      r.key_send_bytes = n(key, "send");
      r.key_receive_bytes = n(key, "receive");
      r.created = qint64(c.value("created").toDouble());
      rows.push_back(std::move(r));
    }
  }
  return rows;
}

QVariant CallModel::data(const QModelIndex& index, int role) const {
  if (!index.isValid()) return {};
  const Row& r = rows_.at(std::size_t(index.row()));
  if (role == Qt::BackgroundRole) {
    // Not under the one-time pad (AES from QKD, or capped to fit the key rate): say so.
    const bool note = r.cipher != "OTP" || r.cap_bits_per_s > 0;
    return index.column() == protection && note ? QVariant(QBrush(QColor(255, 235, 190)))
                                                : QVariant();
  }
  if (role == Qt::UserRole) {
    switch (index.column()) {
      case sent:
        return r.packets_sent;
      case received:
        return r.packets_received;
      case key_used:
        return r.key_send_bytes + r.key_receive_bytes;
      default:
        return {};
    }
  }
  if (role != Qt::DisplayRole) return {};
  switch (index.column()) {
    case site:
    case call:
    case media:
      return key_cell(r, index.column());
    case state:
      return r.state;
    case endpoint:
      return r.endpoint;
    case lanes:
      return r.lanes;
    case sent:
      return r.packets_sent;
    case received:
      return r.packets_received;
    case key_used:
      return human_bytes(double(r.key_send_bytes)) + " sent, " +
             human_bytes(double(r.key_receive_bytes)) + " received";
    case protection:
      return r.cap_bits_per_s > 0 ? r.cipher + ", capped at " + human_rate(r.cap_bits_per_s)
                                  : r.cipher;
    case duration: {
      const qint64 now = QDateTime::currentSecsSinceEpoch();
      return r.created > 0 ? human_duration(double(std::max<qint64>(0, now - r.created)))
                           : QString("-");
    }
    default:
      return {};
  }
}

QVariant CallModel::headerData(int section, Qt::Orientation o, int role) const {
  static const QStringList names{"Site",
                                 "Call-ID",
                                 "Media",
                                 "State",
                                 "Endpoint",
                                 "Key lanes (send / receive)",
                                 "Packets to the partner",
                                 "Packets to the endpoint",
                                 "Key used",
                                 "Protection",
                                 "Duration"};
  return header(names, section, o, role);
}

void JobModel::update_site(const QString& service, const QJsonObject& document) {
  auto next = rows_;
  std::erase_if(next, [&](const auto& r) { return r.first == service; });
  for (const auto& j : document.value("jobs").toArray()) next.emplace_back(service, j.toObject());
  std::stable_sort(next.begin(), next.end(), [](const auto& a, const auto& b) {
    return a.second.value("created_at").toDouble() > b.second.value("created_at").toDouble();
  });
  auto id = [](const auto& r) { return r.first + r.second.value("job_id").toString(); };
  const bool same_rows = next.size() == rows_.size() &&
                         std::equal(next.begin(), next.end(), rows_.begin(),
                                    [&](const auto& a, const auto& b) { return id(a) == id(b); });
  if (same_rows) {  // keeps the operator's selection between polls
    rows_ = std::move(next);
    if (!rows_.empty()) emit dataChanged(index(0, 0), index(int(rows_.size()) - 1, count - 1));
    return;
  }
  beginResetModel();
  rows_ = std::move(next);
  endResetModel();
}

QVariant JobModel::data(const QModelIndex& index, int role) const {
  if (!index.isValid()) return {};
  const QJsonObject& j = rows_.at(std::size_t(index.row())).second;
  const double size = j.value("transfer_size").toDouble();
  const double done = j.value("transferred").toDouble();
  const QString state = j.value("transfer_state").toString();
  if (role == Qt::BackgroundRole && index.column() == transfer_state) {
    if (state == "failed") return QBrush(QColor(255, 205, 205));
    if (state == "completed") return QBrush(QColor(205, 240, 205));
    return {};
  }
  if (role == Qt::UserRole) return j.value("job_id").toString();
  if (role == Qt::ToolTipRole) return j.value("error").toString();
  if (role != Qt::DisplayRole) return {};
  switch (index.column()) {
    case site:
      return rows_.at(std::size_t(index.row())).first;
    case specimen:
      return j.value("specimen_id").toString();
    case job:
      return j.value("job_id").toString();
    case folder:
      return j.value("folder").toString();
    case data_type:
      return j.value("data_type").toString();
    case created:
      return local_time(qint64(j.value("created_at").toDouble()));
    case analysis_state:
      return j.value("analysis_state").toString();
    case analysis_size:
      return human_bytes(j.value("analysis_size").toDouble());
    case analysis_time:
      return local_time(qint64(j.value("analysis_time").toDouble()));
    case transfer_state:
      return state;
    case transfer_size:
      return human_bytes(size);
    case completed:
      return local_time(qint64(j.value("completed_at").toDouble()));
    case method:
      return j.value("method").toString();
    case progress:
      return size > 0 ? QString("%1%").arg(100.0 * done / size, 0, 'f', 0) : QString("-");
    case finishes:
      return finishes_text(j);
    default:
      return {};
  }
}

// When a job should finish, from the forecast its service publishes (otpgate/forecast.hpp).
QString finishes_text(const QJsonObject& job) {
  const QJsonObject f = job.value("forecast").toObject();
  const QString state = job.value("transfer_state").toString();
  if (f.isEmpty() || state == "completed") return "-";
  const QString method = job.value("method").toString().toUpper();
  if (f.value("finishes_at").isDouble()) {
    const QDateTime at = QDateTime::fromMSecsSinceEpoch(qint64(f.value("finishes_at").toDouble()));
    return QString("about %1 under %2 (%3)")
        .arg(QLocale().toString(at.time(), QLocale::ShortFormat), method,
             human_duration(f.value("seconds_left").toDouble()));
  }
  if (f.value("seconds_left").isDouble())
    return "about " + human_duration(f.value("seconds_left").toDouble()) + " at the key rate";
  return "needs " + human_bytes(f.value("key_needed_bytes").toDouble()) + " of key";
}

QVariant JobModel::headerData(int section, Qt::Orientation o, int role) const {
  static const QStringList names{"Service",       "Specimen ID", "Job ID",        "Folder",
                                 "Data type",     "Created",     "Analysis",      "Analysis size",
                                 "Analysis time", "Transfer",    "Transfer size", "Completed",
                                 "Method",        "Progress",    "Finishes"};
  return header(names, section, o, role);
}

// ---------------------------------------------------------------------------
// Alerts

void AlertLog::set(const QString& key, bool on, const QString& text) {
  bool& state = state_[key];
  if (on && !state) {
    const QString line = QDateTime::currentDateTime().toString("HH:mm:ss ") + text;
    insertRows(rowCount(), 1);
    setData(index(rowCount() - 1), line);
    emit raised(text);
  }
  state = on;
}

QStringList AlertLog::active() const {
  QStringList keys;
  for (const auto& [key, on] : state_)
    if (on) keys << key;
  return keys;
}

namespace {
// An alert's line after its time: the site, what happened, and what to do about it.
QString alert_line(const QString& site, const QString& what, const QString& hint) {
  return site + ": " + what + " (" + hint + ")";
}
}  // namespace

void AlertLog::check_gateway(const QString& service, const QJsonObject& status) {
  const QString site = status.value("site").toString();
  // Per link and direction, from the forecast the gateway publishes.
  for (const auto& value : status.value("links").toArray()) {
    const QJsonObject l = value.toObject();
    const QString link =
        l.value("direction").toString() + " link to " + l.value("peer_sae_id").toString();
    const QString where = site + " " + link;
    const QJsonValue left = l.value("seconds_left");
    set("horizon:" + where,
        l.value("direction").toString() == "send" && left.isDouble() &&
            left.toDouble() < thresholds_.horizon_minutes * 60,
        alert_line(site,
                   link + ": at the current rate its key lasts " + human_duration(left.toDouble()) +
                       ", less than the " + QLocale().toString(thresholds_.horizon_minutes) +
                       "-minute horizon",
                   "the QKD link makes less key than is used: fewer or lighter streams, or "
                   "plan the AES fallback"));
    set("kme:" + where, !l.value("kme_healthy").toBool(true),
        alert_line(site, link + ": KME unhealthy: " + l.value("kme_last_error").toString(),
                   "check the KME, the network to it and this SAE's certificate"));
    const int aes = l.value("aes_fallback_streams").toInt();
    set("aes:" + where, aes > 0,
        alert_line(site,
                   link + QString(": AES fallback engaged on %1 of %2 streams")
                              .arg(aes)
                              .arg(l.value("streams").toInt()),
                   "key ran out: media is AES-256-GCM keyed from QKD, not one-time pad"));
  }
  // Per stream: authentication failures, replays and refused AES packets rising.
  for (const auto& value : status.value("streams").toArray()) {
    const QJsonObject o = value.toObject();
    const QString stream = o.value("name").toString();
    for (const char* dir : {"send", "receive"}) {
      const QJsonObject e = o.value(dir).toObject();
      if (e.isEmpty()) continue;
      const QString where = site + " " + stream + " " + dir;
      struct Watched {
        const char* field;
        const char* what;
        const char* hint;
      };
      for (const auto& [field, what, hint] :
           {Watched{"auth-failures", "authentication failures",
                    "dropped, never delivered: tampering, a replaying middlebox or a "
                    "misconfigured peer"},
            Watched{"replays", "replays",
                    "dropped, never delivered: tampering, a replaying middlebox or a "
                    "misconfigured peer"},
            Watched{"drops-cipher", "AES packets refused",
                    "packets marked AES-256-GCM where this site allows the one-time pad only: "
                    "the partner's policy differs from this site's, or they are forged"}}) {
        const qulonglong now = qulonglong(e.value(field).toDouble());
        qulonglong& seen = counters_[service + where + field];
        set(QString(field) + ":" + where + QString::number(now), now > seen,
            alert_line(site, stream + " " + dir + QString(": %1 new %2").arg(now - seen).arg(what),
                       hint));
        seen = now;
      }
    }
  }
  // The gateway's own verdict (what /healthz answers), with its reasons.
  const QJsonObject health = status.value("health").toObject();
  QStringList reasons;
  for (const auto& r : health.value("reasons").toArray()) reasons << r.toString();
  set("health:" + site, health.value("status").toString() == "unhealthy",
      alert_line(site, "gateway unhealthy: " + reasons.join("; "),
                 "its /healthz answers 503 until the reasons clear"));
  const double wiped = status.value("key_wiped_at_stop_bytes").toDouble();
  set("wiped:" + site + QString::number(wiped), wiped > 0,
      alert_line(site,
                 human_bytes(wiped) + " of fetched key was wiped unused when the gateway "
                                      "last stopped",
                 "expected at a stop; much more than the rings hold means they are sized "
                 "above need"));
}

void AlertLog::check_jobs(const QString& service, const QJsonObject& jobs) {
  for (const auto& j : jobs.value("jobs").toArray()) {
    const QJsonObject o = j.toObject();
    const QString id = o.value("job_id").toString();
    set("job:" + service + id, o.value("transfer_state").toString() == "failed",
        "transfer " + id + " (specimen " + o.value("specimen_id").toString() +
            ") failed: " + o.value("error").toString());
  }
}

void AlertLog::service_availability(const QString& service, bool up, const QString& error) {
  set("down:" + service, !up, service + " is down: " + error);
}

}  // namespace otpgate::console
